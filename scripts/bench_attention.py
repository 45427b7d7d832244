"""Per-document attention for packed rows off CUDA (llmstack/train/attention.py `document_kernel`) vs what
transformers' SDPA path does with the same row: one SDPA call under a block-diagonal causal mask over the whole row.
Forward + backward of one attention layer, float32, for a set of packings (row length, document lengths), each
timed as the median of --repeats, the two alternated; also `document_kernel` at other run sizes (the documents that
share one masked call: `RUN_TOKENS`, the shipped value, is the one the ratio is taken at). Checks first that both give
the same output. Prints one line per packing and writes the record `attention`; ratio per packing: mask / ours.

    .venv/bin/python scripts/bench_attention.py                  # SmolLM2-135M's heads (9 query, 3 key/value, 64 dims)
    .venv/bin/python scripts/bench_attention.py --repeats 3      # smoke check
"""

from __future__ import annotations

import argparse
import statistics
import time

import benchrecord

PACKINGS = {  # name: (row length, document lengths)
    "256: 4 docs": (256, [60, 70, 50, 76]),
    "512: 4 docs": (512, [120, 80, 200, 112]),
    "512: 32 short": (512, [16] * 32),
    "1024: 11 docs": (1024, [100] * 10 + [24]),
    "2048: 7 docs": (2048, [300, 250, 400, 200, 350, 248, 300]),
    "2048: 101 short": (2048, [20] * 100 + [48]),
    "300: 1 + 1 + 298": (300, [1, 1, 298]),
    "512: one doc": (512, [512]),
    "2048: one doc": (2048, [2048]),
}
OTHER_RUNS = (1, 512)


def measure(length: int, docs: list[int], a) -> dict[str, float]:
    """Median fwd+bwd milliseconds of each kernel on one packed row, after checking that they agree."""
    import torch
    import torch.nn.functional as F

    from llmstack.train.attention import RUN_TOKENS, document_kernel

    groups = a.heads // a.kv_heads
    q = torch.randn(length, a.heads, a.dim, requires_grad=True)
    k, v = (torch.randn(length, a.kv_heads, a.dim, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, *docs]).cumsum(0).to(torch.int32)
    doc = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(docs))
    mask = ((doc[:, None] == doc[None, :]) & torch.ones(length, length, dtype=torch.bool).tril())[None, None]

    def block_mask():  # transformers' SDPA path: (batch, heads, seq, dim), key/value repeated for GQA
        qq, kk, vv = (t.transpose(0, 1)[None] for t in (q, k, v))
        kk, vv = kk.repeat_interleave(groups, dim=1), vv.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)[0].transpose(0, 1)

    kernels = {"block mask": block_mask}
    for run in (RUN_TOKENS, *OTHER_RUNS):
        kernels[f"ours, runs {run}"] = lambda run=run: document_kernel(q, k, v, cu, max(docs), None, run)
    with torch.no_grad():
        truth = block_mask()
        for label, fn in kernels.items():
            torch.testing.assert_close(fn(), truth, atol=1e-5, rtol=1e-5, msg=f"{label} differs")
    for fn in kernels.values():  # warm-up
        fn().sum().backward()
    times = {label: [] for label in kernels}
    for _ in range(a.repeats):
        for label, fn in kernels.items():
            t = time.perf_counter()
            fn().sum().backward()
            times[label].append((time.perf_counter() - t) * 1000)
    return {label: statistics.median(ts) for label, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15, help="timed forward + backward passes per kernel and packing")
    benchrecord.add_argument(p)
    a = p.parse_args()

    import torch

    from llmstack.train.attention import RUN_TOKENS

    torch.manual_seed(0)
    rows, ratios = [], {}
    print(f"fwd+bwd ms per layer, {a.heads}/{a.kv_heads} heads x {a.dim}, float32, {torch.get_num_threads()} threads")
    for name, (length, docs) in PACKINGS.items():
        assert sum(docs) == length, name
        med = measure(length, docs, a)
        ratios[name] = med["block mask"] / med[f"ours, runs {RUN_TOKENS}"]
        rows.append({"packing": name, "length": length, "documents": len(docs), "ms": med})
        print(f"{name:>18}: " + " | ".join(f"{label} {ms:.1f}" for label, ms in med.items())
              + f" | mask / ours {ratios[name]:.2f}x", flush=True)
    benchrecord.write("attention", settings={"heads": a.heads, "kv_heads": a.kv_heads, "dim": a.dim,
                                             "dtype": "float32", "repeats": a.repeats, "run_tokens": RUN_TOKENS,
                                             "threads": torch.get_num_threads()},
                      figures={"packings": rows}, ratios=ratios,
                      goals={name: ">= 0.9x" for name in ratios}, results=a.results_dir)


if __name__ == "__main__":
    main()
