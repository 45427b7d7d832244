"""Batch generation benchmark: the same chat prompts through
  (offline) vLLM's offline engine as `llmstack generate` runs it (llmstack/serve/batch.py: rows read and rendered by
            its own code, one engine call for the batch), and
  (server)  the guarded API (`llmstack serve` on the vLLM engine, all rails on, as scripts/bench_serve.py starts it),
            the same prompts sent at --concurrency requests in flight,
on one machine, one system after the other, each with a warm-up first, every answer exactly --max-tokens tokens
(ignore_eos). Prints tokens/s of both and their ratio (goal: offline >= 1.5x the server), and writes the record
`generate` (scripts/benchrecord.py). Engine starts are not counted.

    .venv/bin/python scripts/bench_generate.py                  # SmolLM2-135M-Instruct, 64 prompts x 64 tokens
    .venv/bin/python scripts/bench_generate.py --model tiny --prompts 8 --max-tokens 8 --concurrency 4   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path

import benchrecord
from bench_serve import QUESTIONS, start_server, summarize


def prompts_file(path: Path, n: int, max_tokens: int) -> list[list[dict]]:
    """n chat rows (bench_serve's questions, cycled) as `llmstack generate` input; the chats, for the server."""
    chats = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]
    path.write_text("".join(json.dumps({"id": i, "messages": m}) + "\n" for i, m in enumerate(chats)))
    return chats


def bench_offline(model: Path, inp: Path, out: Path, n: int, max_tokens: int, vllm: dict) -> dict:
    """The offline engine on every row at once (one batch), after a warm-up batch of 8."""
    from llmstack.config.generate import Sampling
    from llmstack.config.serve import VllmOptions
    from llmstack.serve.batch import GenerateJob, VllmBatch, prompt_ids
    from llmstack.serve.batch_rows import plan
    from llmstack.serve.engines import load_tokenizer

    sampling = Sampling(temperature=0.0, top_p=1.0, max_tokens=max_tokens, n=1, seed=0, ignore_eos=True)
    job = GenerateJob(model=model, input=inp, out=out, engine="vllm", sampling=sampling, batch_size=n,
                      vllm=VllmOptions(**vllm))
    tok = load_tokenizer(model)
    items = [(prompt_ids(tok, row), row.sampling) for row in plan(inp, sampling, set()).rows]
    engine = VllmBatch(job)
    try:
        engine.run(items[:8])
        t0 = time.perf_counter()
        outputs = engine.run(items)
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    rows = [{"latency": wall, "ttft": None, "tokens": sum(o["tokens"] for o in outs)} for outs in outputs]
    return summarize("offline_vllm_batch", len(items), wall, rows)


async def bench_server(base: str, key: str, chats: list[list[dict]], conc: int, max_tokens: int) -> dict:
    """Every chat through the guarded API, `conc` requests in flight; tokens from each answer's usage."""
    import httpx

    sem = asyncio.Semaphore(conc)
    rows: list[dict] = []

    async def one(client, messages):
        async with sem:
            t0 = time.perf_counter()
            r = await client.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "bench", "messages": messages, "max_tokens": max_tokens,
                                        "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            rows.append({"latency": time.perf_counter() - t0, "ttft": None,
                         "tokens": r.json()["usage"]["completion_tokens"]})

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=conc + 8)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, m) for m in chats))
        return summarize("guarded_server", conc, time.perf_counter() - t0, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model folder, packaged name, or 'tiny'")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32, help="the server's requests in flight")
    ap.add_argument("--dtype", help="vLLM dtype for both (default: the server's shipped setting)")
    benchrecord.add_argument(ap)
    args = ap.parse_args()
    with benchrecord.work_folder("bench_generate_") as work:
        model = benchrecord.model(args.model, work)
        vllm = {"dtype": args.dtype} if args.dtype else {}
        chats = prompts_file(work / "in.jsonl", args.prompts, args.max_tokens)
        print(f"model {model}; {args.prompts} prompts x {args.max_tokens} tokens; server at concurrency "
              f"{args.concurrency}; {os.cpu_count()} CPUs", flush=True)

        proc, base, key = start_server(model, work / "server", vllm)
        try:
            asyncio.run(bench_server(base, key, chats[:8], args.concurrency, args.max_tokens))  # warm-up
            server = asyncio.run(bench_server(base, key, chats, args.concurrency, args.max_tokens))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        print(f"  server  {server['tokens']} tokens in {server['wall_s']:.1f} s = {server['tok_s']:.1f} tok/s",
              flush=True)
        offline = bench_offline(model, work / "in.jsonl", work / "out.jsonl", args.prompts, args.max_tokens, vllm)
        print(f"  offline {offline['tokens']} tokens in {offline['wall_s']:.1f} s = {offline['tok_s']:.1f} tok/s")
        ratio = offline["tok_s"] / server["tok_s"]
        print(f"offline batch vs guarded server at concurrency {args.concurrency}: {ratio:.2f}x tokens/s "
              "(goal >= 1.5x)")
        from llmstack.config.serve import VllmOptions
        from llmstack.serve.engines.base import vllm_dtype

        benchrecord.write("generate", settings={"model": str(model), "prompts": args.prompts,
                                                "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                                                "dtype": vllm_dtype(VllmOptions(**vllm))},
                          figures={"systems": [offline, server]}, ratios={"offline_vs_server_tok_s": ratio},
                          goals={"offline_vs_server_tok_s": ">= 1.5x"}, results=args.results_dir)


if __name__ == "__main__":
    main()
