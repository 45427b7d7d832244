"""`accelerate launch [--config_file recipes/accelerate/X.yaml] -m llmstack.cli.launch recipes/R.yaml --stage sft`

Runs one training stage of a recipe inside the run folder runs/<recipe>/<run id>/, on however many processes
accelerate started. One process: this is `llmstack run R.yaml --only <earlier stages> --only <stage>` (earlier stages
run or are reused as usual). Several processes: every rank builds the same stage context from the manifest (the
earlier stages must be done: run them first with `llmstack run`), all ranks train, rank 0 records the result with
the pipeline's own fingerprint, so the next `llmstack run` reuses the stage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from llmstack.config.recipe import RecipeError, load_recipe
from llmstack.pipeline import fingerprints, plan, run_recipe, stage_context, stage_function
from llmstack.runs import Run, describe_outputs

log = logging.getLogger("llmstack")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except (ValueError, RuntimeError, OSError) as exc:  # ModelSourceError, StageUnavailable, ChatTemplateError, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmstack.cli.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--stage", required=True, help="name of a training stage in the recipe (cpt, sft, dpo, ...)")
    parser.add_argument("--run-id", default="default")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--no-record", action="store_true",
                        help="leave the manifest alone (used when `llmstack run` launched this stage itself)")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

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
        names = [s.name for s in plan(recipe)]
        run_recipe(recipe, a.recipe, a.runs_dir, run_id=a.run_id, only=names[: names.index(a.stage) + 1])
        return 0

    run = Run.open(a.runs_dir, recipe.name, a.run_id)
    ctx = stage_context(recipe, a.recipe, run, a.stage)
    record = not a.no_record and int(os.environ.get("RANK", "0")) == 0
    if record:
        run.record(a.stage, kind=ctx.spec.type, status="running", started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                   fingerprint=fingerprints(recipe)[a.stage])
    t0 = time.perf_counter()
    result = stage_function(ctx.spec.type)(ctx)
    if record:
        run.record(a.stage, status="done", wall_s=round(time.perf_counter() - t0, 2), metrics=result.metrics,
                   outputs=describe_outputs(result.outputs),
                   result={"model": str(result.model) if result.model else None, "datasets": {}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
