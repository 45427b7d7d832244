"""`llmstack card RUN_DIR`: (re)build a run's model card, MODEL_CARD.md (llmstack/registry/card.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llmstack.cli.common import fail, load_recipe_or_exit


def card(run_dir: Annotated[Path, typer.Argument(help="a run folder, e.g. runs/quickstart/default")],
         recipe: Annotated[Path | None, typer.Option(
             help="recipe whose `card:` block to use (default: the run's own recipe, if it is unchanged)")] = None):
    """Write MODEL_CARD.md into a run folder and its final model's folder, from what the run recorded."""
    from llmstack.registry.card import write_run_card

    if not (run_dir / "manifest.json").is_file():
        fail(f"{run_dir} has no manifest.json: give a run folder (runs/<recipe>/<run-id>)")
    try:
        path = write_run_card(run_dir, load_recipe_or_exit(recipe, check_trainer=False) if recipe else None)
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        fail(f"{run_dir}: cannot build its model card: {exc}")
    print(path)
