"""How long a suite takes per model, against raw forward and forward+backward throughput measured in the same run.

    .venv/bin/python scripts/bench_eval.py                         # SmolLM2-135M-Instruct, suite quick
    .venv/bin/python scripts/bench_eval.py --suite smoke --model /path/to/hf-folder
    .venv/bin/python scripts/bench_eval.py --parts robustness,bias,over_refusal,judge     # beyond accuracy
    .venv/bin/python scripts/bench_eval.py --parts all --limit 4                          # a quick does-it-run check

Prints: raw forward tokens/s and forward+backward tokens/s (batch 8 x 256 tokens, no_grad vs loss.backward()), the
suite's wall and CPU seconds with lm-eval's hf backend, and the ratios. Use it to size `eval:` in a recipe: a suite
that takes S seconds here takes about len(eval.stages) * S in the pipeline. On a shared machine wall time inflates;
CPU seconds (all threads) inflate less.

`--parts` picks what to time (comma-separated; default `throughput,suite`):
    throughput    raw forward / forward+backward tokens/s
    suite         the suite, lm-eval hf backend
    robustness    the suite's arc_easy and refusal items under all five perturbations (clean scored once)
    bias          the `bias` task (192 BBQ-style items, 12 options each)
    over_refusal  the `over_refusal` task (40 chat generations)
    judge         both models answer the judge prompt set, then the same model behind a live `llmstack serve`
                  judges each pair in both orders (the model judging itself: a timing, not a verdict)
`--limit N` caps the items (prompts for the judge) of every part. The figures go into a JSON record under
benchmarks/results/ (`eval`: scripts/benchrecord.py).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import benchrecord

from llmstack.serve.readiness import wait_ready

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def raw_throughput(model_dir: Path, batch: int = 8, length: int = 256, reps: int = 3) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    with torch.no_grad():
        model(ids)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            model(ids)
    fwd = batch * length * reps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(reps):
        model(ids, labels=ids).loss.backward()
    fwd_bwd = batch * length * reps / (time.perf_counter() - t0)
    return fwd, fwd_bwd


PARTS = ("throughput", "suite", "robustness", "bias", "over_refusal", "judge")


class Timer:
    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0

    def __str__(self) -> str:
        return f"{self.wall:.0f} s wall, {self.cpu:.0f} s CPU"


def bench_judge(model: Path, limit: int | None, batch_size: int) -> dict:
    """Answers from the model (twice, as stage a and stage b would), then the model behind `llmstack serve` judging."""
    import subprocess
    import sys
    import tempfile

    import yaml

    from llmstack.eval.judge import compare, generate_answers, openai_judge, read_prompts
    from llmstack.eval.run import Target
    from llmstack.paths import SUITES_DIR
    from llmstack.serve.guard import hash_key
    from llmstack.testing import free_port

    prompts = read_prompts(SUITES_DIR / "data" / "judge_prompts.jsonl", limit)
    with Timer() as t:
        answers = generate_answers(Target(model=model, batch_size=batch_size), prompts, max_tokens=128)
    print(f"judge: one model answers {len(prompts)} prompts (<=128 tokens): {t}  (a run generates this twice)")
    fig = {"prompts": len(prompts), "answers_wall_s": t.wall, "answers_cpu_s": t.cpu}
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        key = "sk-bench-judge"
        (Path(tmp) / "keys.yaml").write_text(yaml.safe_dump({"keys": [{"id": "bench", "sha256": hash_key(key),
                                                                       "models": ["*"]}]}))
        (Path(tmp) / "server.yaml").write_text(yaml.safe_dump({"engine": "hf", "model": str(model), "port": port,
                                                               "served_model_name": "judge", "keys": "keys.yaml"}))
        proc = subprocess.Popen([sys.executable, "-m", "llmstack", "serve", "--config", str(Path(tmp) / "server.yaml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if wait_ready(f"http://127.0.0.1:{port}/health", timeout=300, poll_s=0.5,
                          gone=lambda: proc.poll() is not None) == "gone":
                raise RuntimeError(f"llmstack serve exited with {proc.returncode}")
            with Timer() as t:
                # the answers against the same answers in another order: pairs of different texts, as two stages give
                res = compare(prompts, answers, answers[1:] + answers[:1], openai_judge(f"http://127.0.0.1:{port}",
                                                                                        "judge", key))
            print(f"judge: {res.summary['judgements']} judgements over HTTP: {t} (server-side CPU not included); "
                  f"{res.summary['unparsed']} unparsable replies")
            fig.update(judgements=res.summary["judgements"], judgements_wall_s=t.wall,
                       unparsed=res.summary["unparsed"])
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: packaged smollm2-135m-instruct)")
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--parts", default="throughput,suite", help=f"comma-separated: {', '.join(PARTS)}, or all")
    ap.add_argument("--limit", type=int, default=None, help="at most this many items (prompts) per part")
    benchrecord.add_argument(ap)
    args = ap.parse_args()
    parts = PARTS if args.parts == "all" else tuple(args.parts.split(","))
    if bad := [p for p in parts if p not in PARTS]:
        ap.error(f"unknown part(s) {', '.join(bad)}")

    from llmstack.eval.run import Target, evaluate
    from llmstack.eval.tasks import get_task
    from llmstack.models import resolve

    model = Path(args.model) if args.model else resolve("smollm2-135m-instruct")
    target = Target(model=model, batch_size=args.batch_size)
    figures: dict = {}
    if "throughput" in parts:
        fwd, fwd_bwd = raw_throughput(model)
        print(f"raw forward          {fwd:8.0f} tokens/s")
        print(f"raw forward+backward {fwd_bwd:8.0f} tokens/s   (forward-only is {fwd / fwd_bwd:.1f}x faster per token)")
        figures["throughput"] = {"forward_tokens_per_s": fwd, "forward_backward_tokens_per_s": fwd_bwd}

    if "suite" in parts:
        with Timer() as t:
            scores = evaluate(target, args.suite, limit=args.limit)
        print(f"\nsuite {args.suite} on {model.name}: {t}")
        for task, res in scores.items():
            print(f"  {task:14s} n={res['n']:4d}  {res['metric']:28s} {res['score']:.3f}")
        print(f"\n{len(scores)} tasks, {sum(r['n'] for r in scores.values())} items; a recipe evaluating base + 3 "
              f"stages needs about {4 * t.wall / 60:.1f} min of wall time at this machine's current load")
        figures["suite"] = [{"task": task, "n": r["n"], "metric": r["metric"], "score": r["score"]}
                            for task, r in scores.items()]
        figures["suite_time"] = {"wall_s": t.wall, "cpu_s": t.cpu}

    if "robustness" in parts:
        from llmstack.eval.perturb import KINDS
        from llmstack.eval.robustness import robustness

        with Timer() as t:
            rob = robustness(target, "quick", KINDS, limit=args.limit, tasks=["arc_easy", "refusal"])
        print(f"\nrobustness (quick: arc_easy, refusal; {', '.join(KINDS)}): {t}")
        for task, kinds in rob.items():
            for kind, r in kinds.items():
                print(f"  {task:10s} {kind:10s} n={r['n']:3d} clean {r['clean']:.3f} perturbed {r['perturbed']:.3f} "
                      f"consistency {r['consistency']:.3f}")
        figures["robustness"] = [{"task": task, "perturbation": kind, "n": r["n"], "clean": r["clean"],
                                  "perturbed": r["perturbed"], "consistency": r["consistency"]}
                                 for task, kinds in rob.items() for kind, r in kinds.items()]
        figures["robustness_time"] = {"wall_s": t.wall, "cpu_s": t.cpu}

    for task in ("bias", "over_refusal"):
        if task in parts:
            with Timer() as t:
                res = evaluate(target, "safety", limit=args.limit, tasks=[task])[task]
            # the task's other release readings (bias: amb_bias_score, accuracy_disamb); None when the items hold no
            # context of that kind
            extra = "".join(f", {r.key.split(',')[0]} {res['all'].get(r.key)}" for r in get_task(task).safety
                            if r.key != get_task(task).primary)
            print(f"\n{task} ({res['n']} items): {t}; {res['metric']} {res['score']:.3f}{extra}")
            figures[task] = {"n": res["n"], "metric": res["metric"], "score": res["score"], "wall_s": t.wall,
                             "cpu_s": t.cpu}

    if "judge" in parts:
        print()
        figures["judge"] = bench_judge(model, args.limit, args.batch_size)
    ratios = {}
    if "throughput" in figures:
        ratios["forward_vs_forward_backward_tokens_per_s"] = (figures["throughput"]["forward_tokens_per_s"]
                                                               / figures["throughput"]["forward_backward_tokens_per_s"])
    benchrecord.write("eval", settings={"model": model.name, "suite": args.suite, "parts": list(parts),
                                        "limit": args.limit, "batch_size": args.batch_size},
                      figures=figures, ratios=ratios, results=args.results_dir)


if __name__ == "__main__":
    main()
