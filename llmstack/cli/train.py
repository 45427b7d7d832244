"""`llmstack train RECIPE --stage sft [--launch cpu-ddp]`: run one training stage (and the earlier stages it needs).

Without a launch config the stage runs in this process through the pipeline. With one (`--launch`, or the stage's
`launch:` in the recipe), the earlier stages run here first and the stage itself runs under
`accelerate launch --config_file recipes/accelerate/<name>.yaml -m llmstack.worker ...` (llmstack/launchers.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Annotated

import typer

from llmstack.cli.common import RecipeArg, RunIdOpt, RunsDirOpt, console, fail, load_recipe_or_exit, setup_logging


def train(recipe: RecipeArg,
          stage: Annotated[str, typer.Option(help="training stage name (cpt, sft, dpo, or the stage's `name`)")],
          launch: Annotated[str | None, typer.Option(
              help="accelerate config: cpu, cpu-ddp, cpu-zero3, ddp, fsdp2, zero3 or a YAML path (default: the stage's "
                   "`launch:`, else in-process)")] = None,
          run_id: RunIdOpt = "default",
          runs_dir: RunsDirOpt = Path("runs")):
    """Train one stage of a recipe, on one process or under `accelerate launch`."""
    from llmstack.config.train import launch_config_path
    from llmstack.launchers import Accelerate

    setup_logging()
    r = load_recipe_or_exit(recipe)
    specs = {s.id: s for s in r.stages}
    if stage not in specs:
        fail(f"'{stage}' is not a training stage of {recipe} (stages: {list(specs)})", code=2)
    launch = launch or specs[stage].launch
    if not launch:
        from llmstack.worker import main

        raise typer.Exit(main([str(recipe), "--stage", stage, "--run-id", run_id, "--runs-dir", str(runs_dir)]))
    try:
        launcher = Accelerate(launch_config_path(launch))
    except ValueError as exc:
        fail(exc, code=2)
    # The launched processes read the earlier stages' outputs from the manifest: run (or reuse) them here first; the
    # launched ranks then record the stage themselves (rank 0, through the pipeline's recorder).
    from llmstack.pipeline import run_through

    run = run_through(r, recipe, runs_dir, run_id, stage, including=False)
    cmd = launcher.command(recipe, stage, run_id, runs_dir, handoff=False, log_dir=run.stage_dir(stage) / "launch")
    console.print(" ".join(cmd))
    raise typer.Exit(subprocess.run(cmd).returncode)
