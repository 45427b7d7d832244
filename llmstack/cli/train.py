"""`llmstack train RECIPE --stage sft [--launch cpu-ddp]`: run one training stage (and the earlier stages it needs).

Without a launch config the stage runs in this process through the pipeline. With one (`--launch`, or the stage's
`launch:` in the recipe), the earlier stages run here first and the stage itself runs under
`accelerate launch --config_file recipes/accelerate/<name>.yaml -m llmstack.cli.launch ...` (llmstack/cli/launch.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmstack.cli.common import RecipeArg, RunIdOpt, RunsDirOpt, console, fail, load_recipe_or_exit, setup_logging


def train(recipe: RecipeArg,
          stage: Annotated[str, typer.Option(help="training stage name (cpt, sft, dpo, or the stage's `name`)")],
          launch: Annotated[Optional[str], typer.Option(
              help="accelerate config: cpu, cpu-ddp, cpu-zero3, ddp, fsdp2, zero3 or a YAML path (default: the stage's "
                   "`launch:`, else in-process)")] = None,
          run_id: RunIdOpt = "default",
          runs_dir: RunsDirOpt = Path("runs")):
    """Train one stage of a recipe, on one process or under `accelerate launch`."""
    from llmstack.config.train import launch_config_path

    setup_logging()
    r = load_recipe_or_exit(recipe)
    specs = {s.id: s for s in r.stages}
    if stage not in specs:
        fail(f"'{stage}' is not a training stage of {recipe} (stages: {list(specs)})", code=2)
    launch = launch or specs[stage].launch
    common = ["--stage", stage, "--run-id", run_id, "--runs-dir", str(runs_dir)]
    if not launch:
        from llmstack.cli.launch import main

        raise typer.Exit(main([str(recipe), *common]))
    try:
        config = launch_config_path(launch)
    except ValueError as exc:
        fail(exc, code=2)
    # The launched processes read the earlier stages' outputs from the manifest: run (or reuse) them here first.
    from llmstack.pipeline import plan, run_recipe

    names = [s.name for s in plan(r)]
    earlier = names[: names.index(stage)]
    if earlier:
        os.environ["LLMSTACK_LAUNCHED"] = "1"
        run_recipe(r, recipe, runs_dir, run_id=run_id, only=earlier)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "llmstack.cli.launch",
           str(recipe), *common]
    console.print(" ".join(cmd))
    raise typer.Exit(subprocess.run(cmd).returncode)
