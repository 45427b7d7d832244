"""`accelerate launch [--config_file recipes/accelerate/X.yaml] -m llmstack.train recipes/R.yaml --stage sft`

Runs one training stage of a recipe inside the run folder runs/<recipe>/<run id>/, on however many processes
accelerate started. One process: this is `llmstack run R.yaml --only <earlier stages> --only <stage>` (earlier stages
run or are reused as usual). Several processes: every rank builds the same stage context from the manifest (the
earlier stages must be done: run them first with `llmstack run`), all ranks train, rank 0 records the result.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("llmstack")


def _fingerprints(recipe):
    """The pipeline's fingerprint chain (llmstack.pipeline.run_recipe), so a stage recorded here counts as fresh there."""
    from llmstack.pipeline import _spec_json, plan
    from llmstack.runs import sha256_json

    out, upstream = {}, sha256_json({"seed": recipe.seed})
    for step in plan(recipe):
        upstream = out[step.name] = sha256_json({"kind": step.kind, "spec": _spec_json(step.spec), "upstream": upstream})
    return out


def stage_context(recipe, recipe_path: Path, run, stage: str):
    """The StageContext the pipeline would build for `stage`, from the manifest's finished earlier stages."""
    from llmstack.pipeline import StageContext, plan

    steps = plan(recipe)
    models, datasets, current = {}, {}, None
    for step in steps:
        if step.name == stage:
            return StageContext(recipe=recipe, recipe_path=recipe_path, run=run, name=stage,
                                dir=run.stage_dir(stage), spec=step.spec, model=current, models=models,
                                datasets=datasets)
        entry = run.entry(step.name) or {}
        if entry.get("status") != "done":
            raise SystemExit(f"error: stage '{step.name}' (before '{stage}') has not finished in {run.dir}; run "
                             f"`llmstack run {recipe_path} --only {step.name}` first (multi-process launches read "
                             f"earlier stages' outputs from the manifest)")
        result = entry.get("result") or {}
        if result.get("model"):
            current = Path(result["model"])
            models["base" if step.name == "model" else step.name] = current
        datasets.update({k: Path(v) for k, v in (result.get("datasets") or {}).items()})
    raise SystemExit(f"error: no stage named '{stage}' in {recipe_path} (stages: {', '.join(s.name for s in steps)})")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except (ValueError, RuntimeError, OSError) as exc:  # ModelSourceError, StageUnavailable, ChatTemplateError, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmstack.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--stage", required=True, help="name of a training stage in the recipe (cpt, sft, dpo, ...)")
    parser.add_argument("--run-id", default="default")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--no-record", action="store_true",
                        help="leave the manifest alone (used when `llmstack run` launched this stage itself)")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    from llmstack.recipe import RecipeError, load_recipe

    try:
        recipe = load_recipe(a.recipe)
    except RecipeError as exc:
        print(exc, file=sys.stderr)
        return 2
    training = [s.id for s in recipe.stages]
    if a.stage not in training:
        print(f"error: '{a.stage}' is not a training stage of {a.recipe} (training stages: {training})", file=sys.stderr)
        return 2

    os.environ["LLMSTACK_LAUNCHED"] = "1"  # we are the launched process: a stage with `launch:` must not launch again
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not a.no_record:
        # One process: the ordinary pipeline (runs or reuses the earlier stages, records everything).
        from llmstack.pipeline import plan, run_recipe

        names = [s.name for s in plan(recipe)]
        run_recipe(recipe, a.recipe, a.runs_dir, run_id=a.run_id, only=names[: names.index(a.stage) + 1])
        return 0

    from llmstack.pipeline import stage_function
    from llmstack.runs import Run

    run = Run.open(a.runs_dir, recipe.name, a.run_id)
    ctx = stage_context(recipe, a.recipe, run, a.stage)
    record = not a.no_record and int(os.environ.get("RANK", "0")) == 0
    if record:
        run.record(a.stage, kind=ctx.spec.type, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                   fingerprint=_fingerprints(recipe)[a.stage])
    t0 = time.perf_counter()
    result = stage_function(ctx.spec.type)(ctx)
    if record:
        from llmstack.runs import describe_outputs

        run.record(a.stage, status="done", wall_s=round(time.perf_counter() - t0, 2), metrics=result.metrics,
                   outputs=describe_outputs(result.outputs),
                   result={"model": str(result.model) if result.model else None, "datasets": {}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
