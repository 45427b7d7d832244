"""Tokens/s of llmstack's SFT path vs TRL SFTTrainer defaults, same model, data, batch and length, in one run.

    .venv/bin/python scripts/bench_train.py                      # SmolLM2-135M-Instruct, a few steps each
    .venv/bin/python scripts/bench_train.py --model tiny --steps 20
    .venv/bin/python scripts/bench_train.py --data runs/quickstart/default/curate/sft --lora

"TRL defaults" is SFTConfig with only the run's size set (max_steps, batch, max_length): bf16=True,
gradient_checkpointing=True, no packing. "llmstack" is what the sft stage uses: the device policy's defaults (on a CPU
with AVX512-BF16/AMX: bf16 base weights under LoRA, float32 weights + bf16 autocast without; on other CPUs float32;
no checkpointing; on CUDA bf16 + Liger kernels), bfd packing with per-document attention (llmstack/train/attention.py:
PyTorch's varlen flash kernel on CUDA, SDPA per run of documents on the CPU), assistant-only loss. A third row runs the
llmstack path on SDPA with transformers' block-diagonal mask over the whole row, to show what per-document attention
is worth. Tokens are real (non-padding) tokens
seen by the model; the first step (warm-up) is excluded from the timing. On CUDA it also prints MFU (6·N·tokens/s over
the card's bf16 peak) and peak memory. Prints a table and the ratio, and writes a JSON record under benchmarks/results/
(`train`, `train-lora`, `train-cuda`, ... : scripts/benchrecord.py); timings go there, never into tests.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import benchrecord  # noqa: E402

# torch and transformers load in the functions that use them: `--help` answers without their ~7 s import

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

WORDS = ("the model learns to answer questions about data training evaluation serving tokens packing attention "
         "gradient optimizer batch sequence document assistant user system language science history music").split()


def synthetic_chat(n: int, seed: int = 0):
    """Chat rows of varied length (as real SFT data is: short answers and long ones), deterministic."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choices(WORDS, k=rng.randint(5, 40))) + "?"
        a = " ".join(rng.choices(WORDS, k=int(rng.paretovariate(1.2) * 30))[:400]) + "."
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return Dataset.from_list(rows)


def step_timer():
    """A callback timing every step after the first (the first pays for lazy init and allocator warm-up): `.elapsed`
    seconds over `.steps` steps."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.elapsed = 0.0
            self.steps = 0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > 1:
                self.elapsed += time.perf_counter() - self.t0
                self.steps += 1

    return StepTimer()


def run(label: str, model_dir: Path, data, tokenizer, args_kwargs: dict, lora: bool, varlen: bool = False,
        dtype: str = "float32") -> dict:
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from llmstack.train.loading import load_model, packed_attention

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
                         **args_kwargs)
        attention = packed_attention(args) if varlen else None
        model = load_model(model_dir, dtype, attention=attention)
        timer = step_timer()
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                    task_type="CAUSAL_LM") if lora else None,
                             callbacks=[timer])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        hist = [h for h in trainer.state.log_history if "num_tokens" in h]
        tokens_after_first = hist[-1]["num_tokens"] - hist[0]["num_tokens"]
        n_params = sum(p.numel() for p in trainer.model.parameters())
    row = {"path": label, "attention": attention or "sdpa", "steps": timer.steps, "tokens": int(tokens_after_first),
           "tokens_per_s": tokens_after_first / timer.elapsed, "s_per_step": timer.elapsed / max(timer.steps, 1),
           "weights": dtype, "optim": str(args.optim).split(".")[-1].lower(), "compile": args.torch_compile,
           "bf16": args.bf16, "liger": args.use_liger_kernel, "grad_ckpt": args.gradient_checkpointing,
           "packing": args.packing}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        row["mfu"] = 6 * n_params * row["tokens_per_s"] / peak if peak else None
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def random_llama_1b(out: Path) -> Path:
    """The 1.1B Llama shape (TinyLlama: 22 layers, hidden 2048, GQA 32/4 heads), random init, with the test BPE
    tokenizer: no hub needed, and throughput does not depend on the weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmstack.testing import build_tiny_model

    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return out  # built by an earlier run on this machine (gpu_check.sh builds it once for all its blocks)
    build_tiny_model(out)  # tokenizer, chat template, generation_config
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096,
                      tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="packaged name, HF folder, 'tiny', or 'llama-1.1b-random' (TinyLlama shape, random init)")
    p.add_argument("--data", help="curated messages DatasetDict folder (default: synthetic chat rows)")
    p.add_argument("--steps", type=int, default=4, help="steps per path (the first is not timed)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lora", action="store_true", help="LoRA r=16 all-linear on both paths")
    p.add_argument("--candidates", action="store_true",
                   help="also time the alternatives: on CPU float32 without and with bf16 autocast; everywhere bf16 "
                        "weights, torch.compile, and bf16 weights at twice the micro-batch")
    benchrecord.add_argument(p)
    a = p.parse_args()
    # a named model is staged in a temp folder (the tiny one is built there), removed when the run ends
    with benchrecord.work_folder("bench_train_") as staging:
        bench(a, staging)


def bench(a: argparse.Namespace, staging: Path) -> None:

    import torch

    from llmstack.device import Capabilities, policy
    from llmstack.stages.sft import SFT_DEFAULTS
    from llmstack.train.loading import load_tokenizer
    from llmstack.train.setup import device_defaults, liger_defaults
    from llmstack.train.templates import training_chat_template

    if a.model == "llama-1.1b-random":
        model_dir = random_llama_1b(Path(tempfile.gettempdir()) / "llmstack-llama-1.1b-random")
    else:
        model_dir = benchrecord.model(a.model, staging)
    if a.data:
        from datasets import load_from_disk

        data = load_from_disk(a.data)["train"]
    else:
        data = synthetic_chat(a.batch * a.steps * 8)
    size = {"max_steps": a.steps, "per_device_train_batch_size": a.batch, "max_length": a.max_length,
            "use_cpu": not torch.cuda.is_available()}

    trl_tok = load_tokenizer(model_dir)
    ours_tok = load_tokenizer(model_dir)
    ours_tok.chat_template = training_chat_template(ours_tok)
    weights = policy().train_weights("auto", adapter=a.lora)  # what the sft stage loads under model.dtype: auto
    ours = {**device_defaults(weights), **SFT_DEFAULTS, **liger_defaults(), **size}  # the run's size wins
    caps = Capabilities.detect()
    print(f"device policy: weights {weights}, trainer {device_defaults(weights)} (cpu_bf16 {caps.cpu_bf16}, "
          f"avx512 {caps.avx512}, cuda {caps.cuda})")
    rows = [run("TRL SFTTrainer defaults", model_dir, data, trl_tok, size, a.lora),
            run("llmstack sft", model_dir, data, ours_tok, ours, a.lora, varlen=True, dtype=weights)]
    block_mask = None
    if rows[1]["attention"] != "sdpa":  # what per-document attention is worth: the same path on SDPA + block mask
        block_mask = run("llmstack sft, SDPA", model_dir, data, ours_tok, ours, a.lora)
        rows.append(block_mask)
    if a.candidates and not torch.cuda.is_available():
        # the CPU's alternatives to the policy's choice: float32 without autocast (the CPU default before the policy
        # measured bf16) and bf16 autocast over float32 weights
        rows.append(run("candidate: float32, no autocast", model_dir, data, ours_tok, {**ours, "bf16": False},
                        a.lora, varlen=True))
        rows.append(run("candidate: float32 weights, bf16 autocast", model_dir, data, ours_tok,
                        {**ours, "bf16": caps.cpu_bf16}, a.lora, varlen=True))
    if a.candidates:
        # Not defaults yet: measured first (the 50% MFU goal). bf16 weights drop the fp32 master copy that bf16
        # autocast re-casts every step (and halve AdamW's state), at the price of bf16 rounding in the update (the
        # optimizer is already transformers' default fused AdamW). torch.compile meets a new packed length on most
        # steps: watch for recompiles eating the gain.
        rows.append(run("candidate: bf16 weights", model_dir, data, ours_tok, ours, a.lora, varlen=True,
                        dtype="bfloat16"))
        rows.append(run("candidate: torch.compile", model_dir, data, ours_tok, {**ours, "torch_compile": True}, a.lora,
                        varlen=True))
        # Larger micro-batches fill the card better where Liger's fused linear + cross-entropy (on with CUDA and
        # liger-kernel: the `liger` column) keeps the logits from taking the memory; bf16 weights free more of it.
        rows.append(run("candidate: bf16 weights, micro-batch x2", model_dir, data, ours_tok,
                        {**ours, "per_device_train_batch_size": 2 * a.batch}, a.lora, varlen=True, dtype="bfloat16"))

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nmodel {model_dir.name}, {device}, batch {a.batch} x max_length {a.max_length}, "
          f"{a.steps} steps each (first untimed){', LoRA r=16' if a.lora else ''}")
    cols = ["path", "attention", "weights", "optim", "compile", "bf16", "liger", "grad_ckpt", "packing", "steps",
            "tokens", "s_per_step", "tokens_per_s"]
    cols += ["mfu", "peak_gib"] if torch.cuda.is_available() else []
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    ratio = rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']
    print(f"ratio llmstack / TRL defaults (tokens/s): {ratio:.2f}x")
    ratios = {"llmstack_vs_trl_defaults_tokens_per_s": ratio}
    if block_mask is not None:
        ratios["per_document_vs_block_mask_tokens_per_s"] = rows[1]["tokens_per_s"] / block_mask["tokens_per_s"]
        print(f"ratio per-document attention / SDPA block mask (tokens/s): "
              f"{ratios['per_document_vs_block_mask_tokens_per_s']:.2f}x")
    name = "train" + ("-lora" if a.lora else "") + ("-candidates" if a.candidates else "") + \
        ("-cuda" if torch.cuda.is_available() else "")
    benchrecord.write(name, settings={"model": model_dir.name, "data": a.data or "synthetic chat rows",
                                      "steps": a.steps, "batch": a.batch, "max_length": a.max_length,
                                      "lora": a.lora, "device": device,
                                      "policy": {"weights": weights, "trainer": device_defaults(weights),
                                                 "cpu_bf16": caps.cpu_bf16, "avx512": caps.avx512}},
                      figures={"paths": [{c: r.get(c) for c in cols} for r in rows]},
                      ratios=ratios,
                      goals={"llmstack_vs_trl_defaults_tokens_per_s": ">= 1.5x"}, results=a.results_dir)


if __name__ == "__main__":
    main()
