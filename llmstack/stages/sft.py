"""Pipeline stage `sft`: supervised fine-tuning on chat `messages` with TRL's SFTTrainer.

Loss on assistant tokens only (TRL's `assistant_only_loss`, which needs {% generation %} markers in the chat template:
a ChatML template without them is given an equivalent marked one for training, and the ORIGINAL is saved with the
model), sequences packed best-fit-decreasing with per-document attention (TRL's `bfd` packing: position_ids restart
at each document; llmstack/train/attention.py attends within each one), full / LoRA / QLoRA.

A dataset with a `tools` column (tool-call conversations) trains with the tool-aware template (llmstack.tools) and
saves THAT template with the model: its calls are assistant text, so assistant-only loss trains on them.

A dataset whose assistant turns think (`reasoning_content`; the stage's `thinking: auto|on|off`) trains with the
reasoning template (llmstack/train/thinking.py: thinking + answer of the last turn, tools too) and saves that template.
"""

from __future__ import annotations

from contextlib import nullcontext

from llmstack.stage import StageContext, StageResult
from llmstack.train import checkpoints, loading, report, setup, templates, thinking

SFT_DEFAULTS = {
    "assistant_only_loss": True,
    "packing": True,
    "packing_strategy": "bfd",  # truncates an overflowing conversation's end; never splits one across rows
    "max_length": 1024,
}


def run(ctx: StageContext) -> StageResult:
    from datasets import load_from_disk
    from trl import SFTTrainer

    # ---- load -----------------------------------------------------------------------------------------------------
    args = setup.trainer_config(ctx, {**SFT_DEFAULTS, **setup.liger_defaults()})
    tokenizer = loading.load_tokenizer(ctx.model)
    original_template = tokenizer.chat_template
    data = load_from_disk(str(ctx.datasets[ctx.spec.dataset]))
    thinks = thinking.wanted(ctx.spec.thinking, data["train"])
    if thinks:
        # Thinking rows (with or without tools): train with the reasoning template and save it with the model, so the
        # served model opens its answer with the thinking block it was trained to write.
        tokenizer.chat_template = original_template = thinking.chat_template(tokenizer)
    elif "tools" in data["train"].column_names:
        # Tool conversations (curation's `tools` column, which TRL's SFTTrainer passes to apply_chat_template): train
        # with the tool template and save it with the model, so the served model renders tools as it was trained.
        tokenizer.chat_template = original_template = templates.tool_chat_template(tokenizer, args.assistant_only_loss)
    elif args.assistant_only_loss:
        tokenizer.chat_template = templates.training_chat_template(tokenizer)
    first = data["train"][0]
    rendered = tokenizer.apply_chat_template(first["messages"], tools=first.get("tools") or None, tokenize=False)
    templates.check_single_bos(tokenizer, rendered)
    model = loading.load_model(ctx.model, loading.weights_dtype(ctx), qlora=ctx.spec.qlora, scratch=ctx.dir,
                               attention=loading.packed_attention(args))

    # ---- train ----------------------------------------------------------------------------------------------------
    with thinking.trl_stop_probe_quiet() if thinks else nullcontext():
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data["train"],
            eval_dataset=setup.eval_split(data, args),
            processing_class=tokenizer,
            peft_config=loading.peft_config(ctx.spec),
        )
    output = trainer.train(resume_from_checkpoint=checkpoints.resume_checkpoint(ctx, trainer))

    # ---- save -----------------------------------------------------------------------------------------------------
    return report.finish(ctx, trainer, output, tokenizer, original_template)
