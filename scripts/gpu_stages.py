"""The Python blocks of scripts/gpu_check.sh: each prints a markdown table (rows start with '|').

    python3 scripts/gpu_stages.py kernel   # varlen attention kernel vs one SDPA call per document, forward + backward
    python3 scripts/gpu_stages.py stages   # QLoRA sft and LoRA dpo through the real llmstack stages
    python3 scripts/gpu_stages.py grpo     # a GRPO stage (issue 10): LoRA, rule-based rewards, transformers generation

On CUDA they use the 1.1B Llama shape with random weights (scripts/bench_train.py builds it once per machine);
GPU_CHECK_DRY=1 rehearses them on CPU with the tiny test model and small sizes.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "scripts")]

import torch  # noqa: E402

DRY = os.environ.get("GPU_CHECK_DRY") == "1"
CUDA = torch.cuda.is_available()


def kernel() -> None:
    from llmstack.train import attention

    if not attention.available():
        print("| skipped: no CUDA varlen kernel here |")
        return
    torch.manual_seed(0)
    lens = [37, 512, 1, 900, 64, 300, 128, 106]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(sum(lens), h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (32, 4, 4))
    g = torch.randn_like(q)
    res = {}
    for name, kern in [("varlen", attention._varlen_kernel()), ("reference", attention.reference_kernel)]:
        out = kern(q, k, v, cu, max(lens), 64 ** -0.5)
        res[name] = [out.float()] + [t.float() for t in torch.autograd.grad(out, (q, k, v), g)]
    print("| tensor | max abs diff | max abs value |")
    for name, a, b in zip(["out", "dq", "dk", "dv"], res["varlen"], res["reference"]):
        print(f"| {name} | {(a - b).abs().max().item():.3g} | {b.abs().max().item():.3g} |")


def _model(root: Path) -> Path:
    if DRY:
        from llmstack.testing import build_tiny_model

        return build_tiny_model(root / "m")
    from bench_train import random_llama_1b

    return random_llama_1b(Path(tempfile.gettempdir()) / "llmstack-llama-1.1b-random")


def _run_stage(model: Path, root: Path, spec: dict, datasets: dict) -> tuple[dict, float, float]:
    """One llmstack stage on `model`: (its metrics, peak GiB on CUDA, wall seconds)."""
    from train_data import make_ctx, make_recipe

    from llmstack.pipeline import stage_function

    recipe = make_recipe(model, datasets, [spec])
    recipe.model.dtype = "bfloat16" if CUDA else "float32"
    ctx = make_ctx(recipe, root / "runs", spec["type"], model, {"d": datasets["d"][1]})
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    metrics = stage_function(spec["type"])(ctx).metrics
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0
    return metrics, peak, time.time() - t0


def stages() -> None:
    from bench_train import synthetic_chat
    from datasets import DatasetDict
    from train_data import preference_dataset

    root = Path(tempfile.mkdtemp())
    model = _model(root)
    rows = synthetic_chat(256)
    DatasetDict({"train": rows, "validation": rows.select(range(8))}).save_to_disk(str(root / "chat"))
    prefs = preference_dataset(root / "prefs", n=256)
    size = {"max_steps": 2 if DRY else 6, "per_device_train_batch_size": 8, "max_length": 256 if DRY else 2048,
            "report_to": [], "save_strategy": "no"}
    print("| stage | adapter | steps | tokens/s | peak GiB | s |")
    for stage, ds, schema, adapter in [("sft", root / "chat", "messages", "qlora"),
                                       ("dpo", prefs, "preference", "lora")]:
        spec = {"type": stage, "dataset": "d", "args": size,
                adapter: {"r": 16, "compute_dtype": "bfloat16"} if adapter == "qlora" else {"r": 16}}
        m, peak, s = _run_stage(model, root, spec, {"d": (schema, ds)})
        print(f"| {stage} | {adapter} | {m['steps']} | {m['tokens_per_s']} | {peak:.1f} | {s:.0f} |")


def grpo() -> None:
    """Generation dominates a GRPO step: 4 prompts x 8 completions x 256 new tokens through HF generate (random
    weights never emit the end of turn, so every completion runs the full 256: the worst case)."""
    from datasets import Dataset, DatasetDict

    root = Path(tempfile.mkdtemp())
    model = _model(root)
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}? End with '#### <number>'."},
                          {"role": "assistant", "content": f"{a} + {b} = {a + b}\n#### {a + b}"}]}
            for a in range(1, 17) for b in range(1, 5)]
    gsm = root / "gsm"
    DatasetDict({"train": Dataset.from_list(rows), "validation": Dataset.from_list(rows[:4])}).save_to_disk(str(gsm))
    batch, new_tokens = (8, 16) if DRY else (32, 256)
    args = {"max_steps": 2 if DRY else 4, "per_device_train_batch_size": batch, "num_generations": 8,
            "max_completion_length": new_tokens, "learning_rate": 1e-5, "report_to": [], "save_strategy": "no"}
    spec = {"type": "grpo", "dataset": "d", "lora": {"r": 16}, "args": args,
            "rewards": [{"type": "gsm8k_answer"}, {"type": "format", "pattern": "#### -?\\d+", "weight": 0.2}]}
    m, peak, s = _run_stage(model, root, spec, {"d": ("messages", gsm)})
    print("| stage | adapter | steps | completions/step | steps/s | peak GiB | s | reward first -> last |")
    print(f"| grpo | lora | {m['steps']} | {batch} x {new_tokens} tok | {m['steps'] / m['train_runtime_s']:.3f} | "
          f"{peak:.1f} | {s:.0f} | {m['reward_first']} -> {m['reward_last']} |")


if __name__ == "__main__":
    {"kernel": kernel, "stages": stages, "grpo": grpo}[sys.argv[1]]()
