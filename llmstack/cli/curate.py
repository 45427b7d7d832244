"""`llmstack curate RECIPE`: run the model + curate stages of a recipe alone (recorded in the run's manifest, so a
later `llmstack run` reuses the curated datasets), then print each dataset's counts.

With `data.executor: {type: slurm, ...}`: `llmstack curate RECIPE --slurm` writes datatrove's Slurm jobs for both
passes plus a last job (`--slurm-collect`) that records the stage, and submits them (`--dry-run`: only writes them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llmstack.cli.common import RecipeArg, RunIdOpt, RunsDirOpt, console, fail, load_recipe_or_exit, setup_logging


def curate(recipe: RecipeArg,
           run_id: RunIdOpt = "default",
           runs_dir: RunsDirOpt = Path("runs"),
           force: Annotated[bool, typer.Option(help="curate again even if sources and config are unchanged")] = False,
           slurm: Annotated[bool, typer.Option(help="submit the curation as Slurm jobs (data.executor slurm)")] = False,
           dry_run: Annotated[bool, typer.Option(help="with --slurm: write the job scripts, submit nothing")] = False,
           slurm_collect: Annotated[bool, typer.Option(hidden=True, help="the Slurm jobs' last step")] = False,
           verbose: bool = False):
    """Curate the recipe's datasets: sources -> filters -> dedup -> decontamination -> splits + data cards."""
    setup_logging(verbose)
    r = load_recipe_or_exit(recipe, check_trainer=False)
    if not r.data.datasets:
        fail(f"{recipe} has no data.datasets to curate")
    from llmstack.data.curate import FROM_SLURM_ENV, CurationError
    from llmstack.data.sources import SourceError
    from llmstack.models import ModelSourceError
    from llmstack.pipeline import run_recipe

    if (slurm or slurm_collect) and r.data.executor.type != "slurm":
        fail(f"--slurm needs a Slurm executor in {recipe}: data.executor: {{type: slurm, partition: NAME}}", code=2)
    if dry_run and not slurm:
        fail("--dry-run goes with --slurm (it writes the Slurm job scripts without submitting them)", code=2)
    if slurm:
        try:
            _submit_slurm(r, recipe, runs_dir, run_id, dry_run)
        except (SourceError, CurationError, ModelSourceError, ValueError) as exc:
            fail(exc)
        return
    if slurm_collect:
        import os

        os.environ[FROM_SLURM_ENV] = "1"  # the passes ran in the Slurm jobs before this one: check and finish
        force = True
    try:
        run = run_recipe(r, recipe, runs_dir, run_id=run_id, only=["model", "curate"],
                         force_from="curate" if force else None)
    except (SourceError, CurationError, ModelSourceError, ValueError) as exc:
        fail(exc)
    metrics = run.manifest["stages"]["curate"].get("metrics", {})
    table = Table(title="curated datasets")
    for col in ("dataset", "rows in", "train", "validation", "quarantined"):
        table.add_column(col)
    for name, c in metrics.items():
        table.add_row(name, str(c["rows_in"]), str(c["train"]), str(c["validation"]), str(c["dropped"]))
    Console().print(table)
    console.print(f"datasets and cards: {run.dir / 'curate'}")


def _submit_slurm(r, recipe: Path, runs_dir: Path, run_id: str, dry_run: bool) -> None:
    import shlex
    import shutil
    import subprocess
    import sys

    from llmstack.data.curate import slurm_jobs
    from llmstack.pipeline import run_recipe, stage_context
    from llmstack.stages.curate import answer_locally

    run = run_recipe(r, recipe, runs_dir, run_id=run_id, only=["model"])  # the tokenizer the token filter uses
    ctx = stage_context(r, recipe, run, "curate")
    collect = shlex.join([sys.executable, "-m", "llmstack", "curate", str(recipe.resolve()), "--run-id", run_id,
                          "--runs-dir", str(runs_dir.resolve()), "--slurm-collect"])
    # a teacher source is answered here, before the jobs are written (their pass 1 reads its samples)
    submit, *jobs = slurm_jobs(r, ctx.dir, ctx.model, collect, Path.cwd().resolve(), answer_locally=answer_locally)
    for job in jobs:
        console.print(f"job script: {job}")
    if dry_run:
        console.print(f"dry run: nothing submitted; submit later with `bash {submit}`")
        return
    if shutil.which("sbatch") is None:
        fail(f"sbatch is not on PATH (run this on a Slurm login node); the scripts are written: `bash {submit}` "
             "submits them")
    proc = subprocess.run(["bash", str(submit)], capture_output=True, text=True)
    if proc.returncode != 0:
        fail(f"sbatch failed: {proc.stderr.strip()[-2000:]}")
    console.print(proc.stdout.strip())
    console.print(f"when the collect job ends, the curated datasets are in {ctx.dir} and `llmstack run` uses them")
