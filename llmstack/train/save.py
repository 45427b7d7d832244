"""Save a trained stage: a plain HF folder (LoRA merged) or a stacked adapter, with the ORIGINAL chat template and
the end-of-turn eos of the input model."""

from __future__ import annotations

import json
from pathlib import Path

from llmstack.train.loading import merge_adapter, save_dtype


def save_model(trainer, ctx, tokenizer, chat_template: str | None) -> Path:
    """Write ctx.dir/model. Call on every process (FSDP/ZeRO gather the weights collectively)."""
    from transformers import GenerationConfig

    spec = ctx.spec
    adapter = spec.lora or spec.qlora
    out = ctx.dir / "model"
    if adapter is None:
        trainer.save_model(str(out))
    else:
        target = ctx.dir / "adapter" if adapter.merge else out
        trainer.save_model(str(target))
        if adapter.merge and trainer.accelerator.is_main_process:
            merge_adapter(target, out, save_dtype(ctx))
        elif trainer.accelerator.is_main_process:
            # A stacked adapter names its base: this stage's input model (loaded and merged by the next stage).
            cfg_file = out / "adapter_config.json"
            cfg = json.loads(cfg_file.read_text())
            cfg["base_model_name_or_path"] = str(Path(ctx.model).resolve())
            cfg_file.write_text(json.dumps(cfg, indent=2))
    if trainer.accelerator.is_main_process:
        tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(out)
        # The input model's generation_config carries the end-of-turn eos (<|im_end|>): keep it verbatim.
        source = Path(ctx.model)
        if (source / "generation_config.json").exists():
            GenerationConfig.from_pretrained(source).save_pretrained(out)
    trainer.accelerator.wait_for_everyone()
    return out
