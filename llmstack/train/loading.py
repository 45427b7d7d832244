"""The stage's starting point: the tokenizer, and the model (full / LoRA / QLoRA) with an adapter-only input merged
onto its base first, under any launch (DeepSpeed ZeRO-3 included)."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


@contextmanager
def whole_model_here():
    """Load (and merge, generate with) a whole model in this process alone, also under DeepSpeed ZeRO-3.

    With ZeRO-3's `zero3_init_flag`, transformers' `from_pretrained` builds the model inside `deepspeed.zero.Init`,
    which partitions every parameter across the ranks: a collective call. Rank 0 merging an adapter or answering the
    probes alone would wait forever for ranks that never join (seen: a 2-process CPU launch hung after training), and
    a partitioned model holds empty tensors. Inside this block transformers sees no DeepSpeed config, so the model
    loads whole on this rank (for training, deepspeed.initialize partitions it later all the same)."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # transformers without its deepspeed integration module
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # the one global from_pretrained consults
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def packed_attention(args) -> str | None:
    """The attention implementation for a padding-free packed stage: per-document attention
    (llmstack/train/attention.py: PyTorch's varlen flash kernel on CUDA, SDPA per run of documents on the CPU) where
    it runs, else None (transformers' SDPA with a block-diagonal mask over the whole row: correct, slower)."""
    from llmstack.train import attention

    padding_free = args.padding_free or (args.packing and args.packing_strategy in {"bfd", "bfd_split"})
    return attention.register() if padding_free and attention.available() else None


def weights_dtype(ctx) -> str:
    """The dtype this training stage loads its model in: the recipe's `model.dtype`, or the device policy's choice
    for `auto` (llmstack/device.py: bf16 base weights under LoRA where the CPU has bf16, else float32)."""
    from llmstack.device import policy

    return policy().train_weights(ctx.recipe.model.dtype, adapter=ctx.spec.lora is not None,
                                  quantized=ctx.spec.qlora is not None)


def save_dtype(ctx) -> str:
    """The dtype merged models are written in: float32 under `model.dtype: auto` (what the stages before the policy
    wrote, and what every later stage, the eval and the quantizer read without loss), else the recipe's."""
    return "float32" if ctx.recipe.model.dtype == "auto" else ctx.recipe.model.dtype


def load_model(folder: Path, dtype: str, qlora=None, attention: str | None = None, scratch: Path | None = None):
    """The stage's starting model. A folder holding only an adapter (from a stage with lora.merge: false) is loaded
    onto its base and merged in memory, so every stage trains a plain model; under QLoRA the merge goes to disk first
    (`merged_copy` in `scratch`, the stage's own folder), as the 4-bit load needs a folder."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = Path(folder)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if attention:
        kwargs["attn_implementation"] = attention
    if qlora is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=qlora.quant_type, bnb_4bit_use_double_quant=qlora.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(qlora.compute_dtype))
    if (folder / "adapter_config.json").exists():
        if qlora is not None:
            folder = merged_copy(folder, scratch or folder.parent, dtype)
        else:
            from peft import PeftModel

            # merged whole on every rank (a ZeRO-3 partitioned base has no weights to merge into); DeepSpeed
            # partitions the merged model when the trainer prepares it
            base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
            with whole_model_here():
                model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
                return PeftModel.from_pretrained(model, folder).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def peft_config(spec):
    adapter = spec.lora or spec.qlora
    if adapter is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=adapter.target_modules, task_type="CAUSAL_LM")


def merged_copy(adapter_dir: Path, stage_dir: Path, dtype: str) -> Path:
    """An adapter-only folder merged onto its base, on disk in the stage's own folder (`merged-input`, removed when the
    stage finishes). Rank 0 merges while the other ranks wait, then they find it. Written to a temporary folder and
    renamed when whole, and stamped with the adapter's hash: a merge cut short by a crash, or an upstream stage that
    trained again into the same folder, is merged anew instead of being taken for the input."""
    import hashlib

    from accelerate import PartialState

    digest = hashlib.sha256()
    for f in sorted(Path(adapter_dir).glob("adapter_*")):  # adapter_config.json, adapter_model.safetensors
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    stamp, out = digest.hexdigest(), Path(stage_dir) / "merged-input"
    with PartialState().main_process_first():  # rank 0 writes the folder, the others then find it
        if (out / "adapter.sha256").exists() and (out / "adapter.sha256").read_text() == stamp:
            return out
        tmp = Path(stage_dir) / f"merged-input.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        merge_adapter(Path(adapter_dir), tmp, dtype)
        (tmp / "adapter.sha256").write_text(stamp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


def merge_adapter(adapter_dir: Path, out: Path, dtype: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    # Merge into a full-precision copy of the base, never into a 4-bit one (QLoRA): the result is a plain model.
    # Called on one rank: the whole model loads here even under ZeRO-3.
    with whole_model_here():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype(dtype))
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        merged.save_pretrained(out)
