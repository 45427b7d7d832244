"""`llmstack generate MODEL INPUT OUT`: batch generation over a dataset (llmstack/serve/batch.py).

    llmstack generate smollm2-135m-instruct prompts.jsonl out.jsonl --n 2 --temperature 0.7
    llmstack generate runs/quickstart/default/final prompts.jsonl out.jsonl --shards 4 --shard $SLURM_ARRAY_TASK_ID
    llmstack generate runs/quickstart/default/final prompts.jsonl out.jsonl --shards 4 --ray 10.0.0.1:6379
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer

from llmstack.cli.common import fail, setup_logging


def generate(model: Annotated[str, typer.Argument(help="model folder or packaged name (llmstack models list)")],
             input: Annotated[Path, typer.Argument(help="JSONL rows ({id, messages | prompt, sampling}), a .parquet "
                                                        "file or a `datasets` folder")],
             out: Annotated[Path, typer.Argument(help="output JSONL; rerunning skips the ids already in it")],
             engine: Annotated[Literal["vllm", "hf"], typer.Option(
                 help="vllm: vLLM's offline engine; hf: transformers generate (fallback)")] = "vllm",
             n: Annotated[int, typer.Option(min=1, max=64, help="outputs per row")] = 1,
             max_tokens: Annotated[int, typer.Option(min=1, help="most tokens per output")] = 256,
             temperature: Annotated[float, typer.Option(min=0, help="0 is greedy")] = 1.0,
             top_p: Annotated[float, typer.Option(max=1, help="nucleus sampling mass")] = 1.0,
             seed: Annotated[int, typer.Option(min=0, help="run seed: a row without its own gets this plus a "
                                                           "hash of its id")] = 0,
             batch_size: Annotated[int, typer.Option(min=1, help="rows per engine call (written and flushed "
                                                                 "after each)")] = 64,
             shards: Annotated[int, typer.Option(min=1, help="split the rows into this many shards by a hash of "
                                                             "their id")] = 1,
             shard: Annotated[int, typer.Option(min=0, help="the shard this process generates (e.g. "
                                                            "$SLURM_ARRAY_TASK_ID)")] = 0,
             ray: Annotated[str | None, typer.Option(help="run all --shards as Ray tasks on this cluster (HOST:PORT "
                                                          "or auto) and merge them into OUT")] = None,
             gpus_per_shard: Annotated[float, typer.Option(min=0, help="with --ray: GPUs each shard's task asks "
                                                                      "Ray for")] = 0,
             max_model_len: Annotated[int | None, typer.Option(min=1, help="context length (default: the "
                                                                          "model's)")] = None):
    """Generate answers for every row of a dataset, resumably, with vLLM's offline engine or transformers."""
    from pydantic import ValidationError

    from llmstack.config.base import format_errors
    from llmstack.config.generate import Sampling
    from llmstack.models import ModelSourceError, resolve
    from llmstack.serve.batch import GenerateError, GenerateJob, InputError, generate_on_ray
    from llmstack.serve.batch import generate as run_generate

    setup_logging()
    if shard >= shards:
        fail(f"--shard {shard} is not below --shards {shards} (shards are numbered 0..{shards - 1})", code=2)
    if ray and shard:
        fail("--ray runs every shard itself; leave --shard out", code=2)
    try:
        folder = resolve(model)
    except ModelSourceError as exc:
        fail(exc, code=2)
    try:
        sampling = Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, n=n, seed=seed)
    except ValidationError as exc:
        fail("; ".join("--" + line.replace("_", "-") for line in format_errors(exc, Sampling)), code=2)
    job = GenerateJob(model=folder, input=input, out=out, engine=engine, batch_size=batch_size, shards=shards,
                      shard=shard, max_model_len=max_model_len, sampling=sampling)
    try:
        summary = generate_on_ray(job, ray, gpus_per_shard) if ray else run_generate(job)
    except (InputError, GenerateError) as exc:
        fail(exc)
    print(json.dumps(summary))
