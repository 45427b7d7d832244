"""Pipeline stage `sft`: supervised fine-tuning on chat `messages` with TRL's SFTTrainer.

Loss on assistant tokens only (TRL's `assistant_only_loss`, which needs {% generation %} markers in the chat template:
a ChatML template without them is given an equivalent marked one for training, and the ORIGINAL is saved with the
model), sequences packed best-fit-decreasing with per-document attention (TRL's `bfd` packing: position_ids restart
at each document and transformers builds a block-diagonal mask from them), full / LoRA / QLoRA.
"""

from __future__ import annotations

from llmstack.stage import StageContext, StageResult
from llmstack.train import common

SFT_DEFAULTS = {
    "assistant_only_loss": True,
    "packing": True,
    "packing_strategy": "bfd",  # truncates an overflowing conversation's end; never splits one across rows
    "max_length": 1024,
}


def run(ctx: StageContext) -> StageResult:
    if ctx.spec.launch and not common.in_launched_process():
        return common.launch(ctx)
    from datasets import load_from_disk
    from trl import SFTTrainer

    # ---- load -----------------------------------------------------------------------------------------------------
    args = common.trainer_config(ctx, {**SFT_DEFAULTS, **common.liger_defaults()})
    tokenizer = common.load_tokenizer(ctx.model)
    original_template = tokenizer.chat_template
    if args.assistant_only_loss:
        tokenizer.chat_template = common.training_chat_template(tokenizer)
    data = load_from_disk(str(ctx.datasets[ctx.spec.dataset]))
    common.check_single_bos(tokenizer, tokenizer.apply_chat_template(data["train"][0]["messages"], tokenize=False))
    model = common.load_model(ctx.model, ctx.recipe.model.dtype, qlora=ctx.spec.qlora,
                              attention=common.packed_attention(args))

    # ---- train ----------------------------------------------------------------------------------------------------
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=common.eval_split(data, args),
        processing_class=tokenizer,
        peft_config=common.peft_config(ctx.spec),
    )
    output = trainer.train(resume_from_checkpoint=common.resume_checkpoint(ctx, trainer))

    # ---- save -----------------------------------------------------------------------------------------------------
    return common.finish(ctx, trainer, output, tokenizer, original_template)
