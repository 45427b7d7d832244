"""The Python blocks of scripts/gpu_check.sh: each prints a markdown table (rows start with '|').

    python3 scripts/gpu_stages.py kernel   # varlen attention kernel vs the CPU kernel (SDPA per document), fwd + bwd
    python3 scripts/gpu_stages.py stages   # QLoRA sft and LoRA dpo through the real llmstack stages
    python3 scripts/gpu_stages.py grpo     # a GRPO stage: LoRA, rule-based rewards, transformers generation
    python3 scripts/gpu_stages.py e2e      # one recipe through every stage with `llmstack run`

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

    if not (CUDA and attention.available()):
        print("| skipped: no CUDA varlen kernel here |")
        return
    torch.manual_seed(0)
    lens = [37, 512, 1, 900, 64, 300, 128, 106]
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(sum(lens), h, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (32, 4, 4))
    g = torch.randn_like(q)
    res = {}
    for name, kern in [("varlen", attention._varlen_kernel()), ("sdpa", attention.document_kernel)]:
        out = kern(q, k, v, cu, max(lens), 64 ** -0.5)
        res[name] = [out.float()] + [t.float() for t in torch.autograd.grad(out, (q, k, v), g)]
    print("| tensor | max abs diff | max abs value |")
    for name, a, b in zip(["out", "dq", "dk", "dv"], res["varlen"], res["sdpa"]):
        print(f"| {name} | {(a - b).abs().max().item():.3g} | {b.abs().max().item():.3g} |")


def _model(root: Path) -> Path:
    if DRY:
        from llmstack.testing import build_tiny_model

        return build_tiny_model(root / "m")
    from bench_train import random_llama_1b

    return random_llama_1b(Path(tempfile.gettempdir()) / "llmstack-llama-1.1b-random")


def _run_stage(model: Path, root: Path, spec: dict, datasets: dict) -> tuple[dict, float, float]:
    """One llmstack stage on `model`: (its metrics, peak GiB on CUDA, wall seconds)."""
    from llmstack.pipeline import stage_function
    from train_data import make_ctx, make_recipe

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


def e2e_recipe(root: Path, model: Path, cuda: bool) -> Path:
    """A GPU recipe through every stage: curate -> sft (full) -> sft (LoRA) -> dpo (LoRA) -> int4 (GPTQ) -> eval ->
    serve (the hf engine: vLLM's CUDA wheel is too large to bring to the GPU machine) -> report. Local data only (the
    GPU machine reaches no registry): synthetic chat rows and preference pairs, curated like any source."""
    import yaml
    from bench_train import synthetic_chat
    from datasets import DatasetDict

    from train_data import preference_dataset

    rows = synthetic_chat(256)
    DatasetDict({"train": rows, "validation": rows.select(range(8))}).save_to_disk(str(root / "chat"))
    prefs = preference_dataset(root / "prefs", n=128)
    # The rehearsal saves a checkpoint every step (the resume path runs); on the GPU a full fine-tune checkpoint of the
    # 1.1B model with AdamW state is ≈11 GB, so none is written there.
    size = {"max_steps": 2 if DRY else 20, "per_device_train_batch_size": 4 if DRY else 8,
            "max_length": 256 if DRY else 2048, "report_to": [],
            **({"save_steps": 1} if DRY else {"save_strategy": "no"})}
    recipe = {
        "name": "gpu-e2e", "seed": 7,
        "model": {"source": str(model), "dtype": "bfloat16" if cuda else "float32"},
        "data": {"cards_dir": str(root / "cards"), "datasets": {
            "chat": {"schema": "messages", "sources": [{"name": "synthetic_chat", "path": str(root / "chat")}]},
            "prefs": {"schema": "preference", "sources": [{"name": "pairs", "path": str(prefs)}]}}},
        "stages": [
            {"type": "sft", "name": "sft_full", "dataset": "chat", "probe": ["Who are you?"],
             "args": {**size, "learning_rate": 1e-5}},
            {"type": "sft", "name": "sft_lora", "dataset": "chat", "lora": {"r": 16, "alpha": 32},
             "args": {**size, "learning_rate": 2e-4}},
            {"type": "dpo", "dataset": "prefs", "lora": {"r": 16, "alpha": 32}, "probe": ["Who are you?"],
             "args": {**size, "max_length": 512, "learning_rate": 5e-6}}],
        "quantize": {"scheme": "w4a16", "method": "gptq", "group_size": 64, "calibration_samples": 16,
                     "serve_fallback": None},
        "eval": {"suite": "quick", "tasks": ["identity"], "limit": 8 if DRY else 20, "backend": "hf",
                 "stages": ["base", "dpo", "int4"], "batch_size": 4},
        "serve": {"engine": "hf", "smoke_question": "Who are you?", "smoke_max_tokens": 16},
    }
    path = root / "gpu-e2e.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def e2e() -> None:
    """`llmstack run` of e2e_recipe in this process; one table row per stage: where it ran and what it measured."""
    from llmstack.config.recipe import load_recipe
    from llmstack.device import policy
    from llmstack.pipeline import run_recipe

    root = Path(tempfile.mkdtemp())
    model = _model(root)
    path = e2e_recipe(root, model, CUDA)
    if not DRY:  # the GPU machine's python is the quantization env too (no vLLM there pins compressed-tensors)
        os.environ.setdefault("LLMSTACK_QUANT_PYTHON", sys.executable)
    p = policy()
    print(f"| policy | device {p.device} | dtype {p.dtype} | eval backend (auto) {p.eval_backend} | "
          f"quant {'/'.join(p.quant_calibration())} | hf engine {'/'.join(p.hf_engine('bfloat16'))} |")
    t0 = time.time()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    run = run_recipe(load_recipe(path), path, root / "runs")
    stages = run.manifest["stages"]
    print("| stage | status | s | what it measured |")
    for name, entry in stages.items():
        m = entry.get("metrics") or {}
        if "steps" in m:
            what = (f"{m['steps']} steps, loss {m['first_loss']} -> {m['last_loss']}, {m['tokens_per_s']} tok/s, "
                    f"{m['distributed']}, probe {[q['answer'][:24] for q in m.get('probe', [])]}")
        elif "w4a16" in m:
            q = m["w4a16"]
            note = f" ({q['device_note']})" if "device_note" in q else ""
            what = (f"GPTQ on {q.get('device')} in {q.get('dtype')}{note}, "
                    f"{q['seconds']} s, {q['size_vs_16bit']}x of 16-bit, answer {q['answer']['text'][:24]!r}")
        elif name == "eval":
            what = "; ".join(f"{k} {v}" for k, v in m.items() if k != "recovery")[:160]
        elif name == "serve":
            what = (f"{m['engine']} engine on {m.get('device')} in {m['dtype']}, {m['completion_tokens']} tokens, "
                    f"{m['tokens_per_s']} tok/s, stream matches {m['stream_matches']}, no key -> {m['no_key_status']}")
        else:
            what = ", ".join(f"{k} {v}" for k, v in m.items() if isinstance(v, (int, float, str)))[:160]
        print(f"| {name} | {entry['status']} | {entry.get('wall_s', '')} | {what} |")
    peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0
    report = next((root / "runs").rglob("report.md"), None)
    print(f"| total | {sum(e['status'] == 'done' for e in stages.values())}/{len(stages)} done | "
          f"{time.time() - t0:.0f} | peak GiB {peak:.1f}; report {report} |")


if __name__ == "__main__":
    {"kernel": kernel, "stages": stages, "grpo": grpo, "e2e": e2e}[sys.argv[1]]()
