"""`llmstack quantize MODEL OUT`: an llm-compressor export (W4A16 / W8A8) that vLLM loads natively."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from llmstack.cli.common import fail, setup_logging


def quantize(model: Annotated[Path, typer.Argument(help="HF model folder (or a packaged model name)")],
             out: Annotated[Path, typer.Argument(help="output folder (compressed-tensors)")],
             scheme: Annotated[str, typer.Option(help="w4a16 | w8a8")] = "w4a16",
             method: Annotated[str, typer.Option(help="gptq | awq | rtn")] = "gptq",
             group_size: Annotated[int, typer.Option(help="W4A16 group size; must divide the hidden size")] = 64,
             calibration: Annotated[Path | None, typer.Option(help="jsonl rows with `messages` or `text`")] = None,
             samples: Annotated[int, typer.Option(help="calibration samples")] = 16,
             seed: int = 42):
    """Quantize a model with llm-compressor (run in its own environment) into a folder vLLM loads natively."""
    setup_logging()
    from llmstack.models import ModelSourceError, resolve
    from llmstack.quant.export import QuantizeError, quantize_cli

    if scheme not in ("w4a16", "w8a8") or method not in ("gptq", "awq", "rtn"):
        fail("--scheme is w4a16 or w8a8; --method is gptq, awq or rtn", code=2)
    try:
        info = quantize_cli(resolve(str(model)), out, scheme, method, group_size, calibration, samples, seed)
    except (QuantizeError, ModelSourceError) as exc:
        fail(exc)
    print(json.dumps(info, indent=2))
