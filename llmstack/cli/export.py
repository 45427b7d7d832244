"""`llmstack export gguf MODEL OUT --type q4_k_m`: a GGUF (and an Ollama Modelfile) by llama.cpp's own converter and
quantizer, for llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llmstack.cli.common import fail, setup_logging

export_app = typer.Typer(no_args_is_help=True, help="Export a model for other runtimes.")


@export_app.command("gguf")
def export_gguf(model: Annotated[Path, typer.Argument(help="HF model folder (a stage's output) or a packaged name")],
                out: Annotated[Path, typer.Argument(help="output folder: one .gguf and .Modelfile per type")],
                type_: Annotated[list[str], typer.Option("--type", help="q4_k_m, q8_0, f16, … (repeat for more)")]
                = ["q4_k_m"],  # noqa: B006 - typer reads the default, never mutates it
                name: Annotated[str | None, typer.Option(help="file name stem (default: the folder's name)")] = None,
                threads: Annotated[int, typer.Option(help="quantization threads (0: all cores)")] = 0,
                force: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
                imatrix_data: Annotated[Path | None, typer.Option(
                    help="calibration rows (.jsonl with `messages` or `text`, chat-rendered with MODEL's template) "
                         "or plain text (.txt): llama-imatrix computes an importance matrix on them for the types "
                         "it helps (k-quants, IQ types; iq1/iq2/iq3_xxs/q2_k_s require it)")] = None):
    """Convert MODEL to GGUF with llama.cpp's converter, quantize it to each --type with llama.cpp (with an importance
    matrix where --imatrix-data is given and the type gains from it), and write an Ollama Modelfile beside each
    file."""
    setup_logging()
    from llmstack.models import ModelSourceError, resolve
    from llmstack.quant.gguf import GGUFError
    from llmstack.quant.gguf import export_gguf as run_export

    try:
        record = run_export(resolve(str(model)), out, type_, name=name, threads=threads, force=force,
                            calibration=imatrix_data)
    except GGUFError as exc:
        fail(exc, code=2)
    except ModelSourceError as exc:
        fail(exc)
    print(json.dumps(record, indent=2))
