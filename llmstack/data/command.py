"""`llmstack curate RECIPE`: run the model + curate stages of a recipe alone (recorded in the run's manifest, so a
later `llmstack run` reuses the curated datasets), then print each dataset's counts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def curate(recipe: Annotated[Path, typer.Argument(help="recipe YAML, e.g. recipes/quickstart.yaml")],
           run_id: Annotated[str, typer.Option(help="run folder name under runs/<recipe name>/")] = "default",
           runs_dir: Annotated[Path, typer.Option(help="root of run folders")] = Path("runs"),
           force: Annotated[bool, typer.Option(help="curate again even if sources and config are unchanged")] = False,
           verbose: bool = False):
    """Curate the recipe's datasets: sources -> filters -> dedup -> decontamination -> splits + data cards."""
    from rich.console import Console
    from rich.table import Table

    from llmstack.cli import _load, _setup_logging, console

    _setup_logging(verbose)
    r = _load(recipe, check_trainer=False)
    if not r.data.datasets:
        console.print(f"[bold red]error:[/] {recipe} has no data.datasets to curate")
        raise typer.Exit(1)
    from llmstack.data.curate import CurationError
    from llmstack.data.sources import SourceError
    from llmstack.models import ModelSourceError
    from llmstack.pipeline import run_recipe

    try:
        run = run_recipe(r, recipe, runs_dir, run_id=run_id, only=["model", "curate"],
                         force_from="curate" if force else None)
    except (SourceError, CurationError, ModelSourceError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1)
    metrics = run.manifest["stages"]["curate"].get("metrics", {})
    table = Table(title="curated datasets")
    for col in ("dataset", "rows in", "train", "validation", "quarantined"):
        table.add_column(col)
    for name, c in metrics.items():
        table.add_row(name, str(c["rows_in"]), str(c["train"]), str(c["validation"]), str(c["dropped"]))
    Console().print(table)
    console.print(f"datasets and cards: {run.dir / 'curate'}")
