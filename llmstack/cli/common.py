"""What every verb shares: the stderr console, logging, and loading a recipe so that its problems print as plain
`yaml.path: problem` lines (exit 2) instead of a traceback."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler

# soft_wrap: a message goes out as one line however narrow the terminal (rich would otherwise break it at the width,
# 80 columns without a terminal, inside a path the user is meant to copy); the terminal wraps it for display.
console = Console(stderr=True, soft_wrap=True)
RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML, e.g. recipes/quickstart.yaml")]
RunIdOpt = Annotated[str, typer.Option(help="run folder name under runs/<recipe name>/")]
RunsDirOpt = Annotated[Path, typer.Option(help="root of run folders")]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", datefmt="%H:%M:%S",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)


def fail(message: object, code: int = 1) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def load_recipe_or_exit(recipe: Path, check_trainer: bool = True):
    from llmstack.config.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, check_trainer=check_trainer)
    except RecipeError as exc:
        recipe_error_exit(exc)


def recipe_error_exit(exc) -> NoReturn:
    """A RecipeError as `llmstack validate` prints it: the file, then one `yaml.path: message` line per problem (also
    for what a stage finds only once it runs: a KTO dataset without undesirable rows, a teacher's tokenizer)."""
    console.print(f"[bold red]{exc.path}: {len(exc.problems)} problem(s)[/]")
    for line in exc.problems:
        print(line)
    raise typer.Exit(2) from None


# ------------------------------------------------------------- admin calls to a running server (route, adapters)
Base = Annotated[str, typer.Option(help="the server's base URL")]
KeyEnv = Annotated[str, typer.Option(help="environment variable holding an admin API key")]


def admin_call(method: str, url: str, key_env: str, body: dict | None = None) -> dict:
    """One admin request (routes, adapters) with the key from $key_env; a refusal is printed as one line."""
    import httpx

    key = os.environ.get(key_env)
    if not key:
        fail(f"${key_env} is not set (an API key with `admin: true`)", code=2)
    try:
        r = httpx.request(method, url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    except httpx.HTTPError as exc:
        fail(f"cannot reach {url}: {exc}")
    if r.status_code != 200:
        msg = r.json().get("error", {}).get("message", r.text) if r.headers.get("content-type", "").startswith(
            "application/json") else r.text
        fail(f"{r.status_code}: {msg}")
    return r.json()
