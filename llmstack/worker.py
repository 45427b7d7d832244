"""`python -m llmstack.worker RECIPE --stage NAME`: the one entry every launched process runs.

`accelerate launch` starts it once per rank (llmstack/launchers.py for a stage with `launch:`; a user's own
`accelerate launch -m llmstack.cli.launch ...`, which is this entry under its documented name; and
scripts/slurm/train.sbatch on each node). It runs the stage here, whatever the stage's `launch:` says.

- One process, recording: the ordinary pipeline, run through `stage` (the earlier stages run or are reused as usual).
- Several processes: every rank builds the same stage context from the manifest (the earlier stages must be done) and
  trains; rank 0 records the stage through the pipeline's one recorder, with the pipeline's own fingerprint, so the
  next `llmstack run` reuses it.
- `--handoff` (the pipeline launched this stage and waits for it): nothing is recorded here; rank 0 leaves the result
  in the stage folder for the pipeline, which records it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from llmstack.config.recipe import RecipeError, load_recipe
from llmstack.launchers import write_handoff
from llmstack.pipeline import fingerprints, plan, run_stage, run_through, stage_context, stage_function
from llmstack.runs import Run


def main(argv: list[str] | None = None, prog: str = "python -m llmstack.worker") -> int:
    try:
        return _main(argv, prog)
    except (ValueError, RuntimeError, OSError) as exc:  # ModelSourceError, StageUnavailable, ChatTemplateError, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None, prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--stage", required=True, help="name of a training stage in the recipe (cpt, sft, dpo, ...)")
    parser.add_argument("--run-id", default="default")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--handoff", "--no-record", dest="handoff", action="store_true",
                        help="leave the manifest alone and hand the result to the process that launched this stage "
                             "(`llmstack run` for a stage with `launch:`)")
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    try:
        recipe = load_recipe(a.recipe)
    except RecipeError as exc:
        print(exc, file=sys.stderr)
        return 2
    training = [s.id for s in recipe.stages]
    if a.stage not in training:
        print(f"error: '{a.stage}' is not a training stage of {a.recipe} (training stages: {training})",
              file=sys.stderr)
        return 2

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not a.handoff:
        run_through(recipe, a.recipe, a.runs_dir, a.run_id, a.stage)
        return 0

    run = Run.open(a.runs_dir, recipe.name, a.run_id)
    ctx = stage_context(recipe, a.recipe, run, a.stage)
    step = next(s for s in plan(recipe) if s.name == a.stage)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0 and not a.handoff:
        run_stage(run, step, ctx, fingerprints(recipe)[a.stage])
        return 0
    result = stage_function(step.kind)(ctx)
    if rank0:
        write_handoff(ctx.dir, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
