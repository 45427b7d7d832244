"""`llmstack sweep`: search a recipe's fields with Optuna (the recipe's `sweep:` block), each trial a real run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llmstack.cli.common import RecipeArg, RunsDirOpt, console, fail, recipe_error_exit, setup_logging


def sweep(recipe: RecipeArg,
          trials: Annotated[int | None, typer.Option(min=1, help="trials to finish (default: sweep.n_trials)")] = None,
          timeout: Annotated[float | None, typer.Option(min=1, help="start no trial after this many seconds "
                                                        "(default: sweep.timeout_s)")] = None,
          storage: Annotated[str | None, typer.Option(help="Optuna storage URL (default: sqlite:///<runs>/<recipe>/"
                                                      "sweep-<study>.db)")] = None,
          study: Annotated[str | None, typer.Option(help="study name (default: sweep.study, else the recipe's "
                                                    "name); the same name resumes it")] = None,
          runs_dir: RunsDirOpt = Path("runs"),
          ray: Annotated[str | None, typer.Option(help="run trials as Ray tasks on this cluster (auto or HOST:PORT; "
                                                  "default: sweep.ray)")] = None,
          verbose: bool = False):
    """Search the recipe's `sweep.space` with Optuna's TPE: each trial is a recipe run (stages no searched value
    changes are run once and reused), scored by its eval; a killed sweep resumes. Writes runs/<recipe>/sweep-<study>/:
    trials.jsonl, best_recipe.yaml, importances.json, objective.png, sweep.md."""
    setup_logging(verbose)
    if study is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", study):
        fail(f"--study '{study}': letters, digits, '_', '.', '-' only (it names files)", code=2)
    from llmstack.config.recipe import RecipeError
    from llmstack.sweep import outputs
    from llmstack.sweep.study import SweepError, make_plan, optimize

    try:
        plan = make_plan(recipe, runs_dir, trials, timeout, storage, study, ray)
        result = optimize(plan)
    except RecipeError as exc:
        recipe_error_exit(exc)
    except SweepError as exc:
        fail(exc, code=2)
    done = outputs.write(result, plan.dir, plan.raw, plan.recipe.sweep.objective)
    _print_trials(done["rows"], plan.recipe.sweep.objective.task, outputs.fmt)
    best = done["best"]
    if best is not None:
        console.print(f"best: trial {best.number}, {plan.recipe.sweep.objective.task} = {best.value:.4f}; "
                      f"`llmstack run {done['files']['best_recipe']}` runs it")
    console.print(f"sweep folder: {plan.dir}  storage: {plan.storage_url}")
    if best is None:
        raise typer.Exit(1)


def _print_trials(rows: list[dict], task: str, fmt) -> None:
    table = Table(title="trials")
    keys = list(rows[0]["params"]) if rows else []
    for col in ("trial", "state", *keys, task, "95% CI", "note"):
        table.add_column(col)
    for r in rows:
        ci = f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r["ci95"] else ""
        table.add_row(str(r["number"]), r["state"], *(fmt(r["params"].get(k)) for k in keys),
                      f"{r['value']:.3f}" if r["value"] is not None else "", ci, (r["error"] or "")[:60])
    Console().print(table)
