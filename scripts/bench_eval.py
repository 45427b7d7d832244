"""How long a suite takes per model, against raw forward and forward+backward throughput measured in the same run.

    .venv/bin/python scripts/bench_eval.py                         # SmolLM2-135M-Instruct, suite quick
    .venv/bin/python scripts/bench_eval.py --suite smoke --model /path/to/hf-folder

Prints: raw forward tokens/s and forward+backward tokens/s (batch 8 x 256 tokens, no_grad vs loss.backward()), the
suite's wall and CPU seconds with lm-eval's hf backend, and the ratios. Use it to size `eval:` in a recipe: a suite
that takes S seconds here takes about len(eval.stages) * S in the pipeline. On a shared machine wall time inflates;
CPU seconds (all threads) inflate less.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF folder (default: packaged smollm2-135m-instruct)")
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()

    from llmstack.eval.run import Target, evaluate
    from llmstack.models import resolve

    model = Path(args.model) if args.model else resolve("smollm2-135m-instruct")
    fwd, fwd_bwd = raw_throughput(model)
    print(f"raw forward          {fwd:8.0f} tokens/s")
    print(f"raw forward+backward {fwd_bwd:8.0f} tokens/s   (forward-only is {fwd / fwd_bwd:.1f}x faster per token)")

    wall0, cpu0 = time.perf_counter(), time.process_time()
    scores = evaluate(Target(model=model, batch_size=args.batch_size), args.suite)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(f"\nsuite {args.suite} on {model.name}: {wall:.0f} s wall, {cpu:.0f} s CPU")
    for task, res in scores.items():
        print(f"  {task:14s} n={res['n']:4d}  {res['metric']:28s} {res['score']:.3f}")
    print(f"\n{len(scores)} tasks, {sum(r['n'] for r in scores.values())} items; a recipe evaluating base + 3 stages "
          f"needs about {4 * wall / 60:.1f} min of wall time at this machine's current load")


if __name__ == "__main__":
    main()
