"""`llmstack curate RECIPE`: run the model + curate stages of a recipe alone (recorded in the run's manifest, so a
later `llmstack run` reuses the curated datasets), then print each dataset's counts."""

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
           verbose: bool = False):
    """Curate the recipe's datasets: sources -> filters -> dedup -> decontamination -> splits + data cards."""
    setup_logging(verbose)
    r = load_recipe_or_exit(recipe, check_trainer=False)
    if not r.data.datasets:
        fail(f"{recipe} has no data.datasets to curate")
    from llmstack.data.curate import CurationError
    from llmstack.data.sources import SourceError
    from llmstack.models import ModelSourceError
    from llmstack.pipeline import run_recipe

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
