"""`llmstack validate` (check a recipe, load nothing) and `llmstack run` (run or resume a recipe end to end)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llmstack.cli.common import (
    RecipeArg,
    RunIdOpt,
    RunsDirOpt,
    console,
    fail,
    load_recipe_or_exit,
    recipe_error_exit,
    setup_logging,
)


def validate(recipe: RecipeArg,
             fast: Annotated[bool, typer.Option(help="skip TRL's own checks of stage args (no trl import)")] = False):
    """Check a recipe without loading any model: prints one `yaml.path: problem` line per problem, exits 2 if any."""
    r = load_recipe_or_exit(recipe, check_trainer=not fast)
    stages = ", ".join(s.id for s in r.stages) or "no training stages"
    console.print(f"[green]{recipe}: OK[/] — {r.name}: {r.model.source}; {stages}")


def run(recipe: RecipeArg,
        run_id: RunIdOpt = "default",
        runs_dir: RunsDirOpt = Path("runs"),
        from_stage: Annotated[str | None, typer.Option("--from", help="re-run from this stage on")] = None,
        only: Annotated[list[str] | None, typer.Option(help="run only these stages (repeatable)")] = None,
        skip_unavailable: Annotated[bool, typer.Option(help="skip stages this version does not implement")] = False,
        verbose: bool = False):
    """Run a recipe end to end (or resume it): stages whose inputs are unchanged are reused."""
    setup_logging(verbose)
    r = load_recipe_or_exit(recipe)
    from llmstack.config.recipe import RecipeError
    from llmstack.models import ModelSourceError
    from llmstack.pipeline import StageUnavailable, run_recipe

    try:
        result = run_recipe(r, recipe, runs_dir, run_id=run_id, force_from=from_stage, only=only,
                            skip_unavailable=skip_unavailable)
    except RecipeError as exc:
        recipe_error_exit(exc)
    except (StageUnavailable, ModelSourceError, ValueError) as exc:
        fail(exc)
    _print_stage_table(result.manifest)
    console.print(f"run folder: {result.dir}")


def _print_stage_table(manifest: dict) -> None:
    table = Table(title="stages")
    for col in ("stage", "status", "wall s"):
        table.add_column(col)
    for name, e in manifest["stages"].items():
        table.add_row(name, e.get("status", ""), f"{e.get('wall_s', 0):.1f}")
    Console().print(table)
