"""Pipeline stage `cpt`: continued pretraining (causal LM loss on every token) on a `text` dataset, with TRL's
SFTTrainer on a language-modelling dataset.

Packing is `bfd_split`: documents are packed best-fit-decreasing with per-document attention, and a document longer
than `max_length` is split into pieces rather than truncated (pretraining text is long; truncation would throw most of
it away). TRL appends the tokenizer's eos after each document.
"""

from __future__ import annotations

from llmstack.stage import StageContext, StageResult
from llmstack.train import checkpoints, loading, report, setup, templates

CPT_DEFAULTS = {
    "packing": True,
    "packing_strategy": "bfd_split",
    "max_length": 1024,
    "dataset_text_field": "text",
}


def run(ctx: StageContext) -> StageResult:
    from datasets import load_from_disk
    from trl import SFTTrainer

    # ---- load -----------------------------------------------------------------------------------------------------
    args = setup.trainer_config(ctx, {**CPT_DEFAULTS, **setup.liger_defaults()})
    tokenizer = loading.load_tokenizer(ctx.model)
    data = load_from_disk(str(ctx.datasets[ctx.spec.dataset]))
    templates.check_single_bos(tokenizer, data["train"][0][args.dataset_text_field])
    model = loading.load_model(ctx.model, loading.weights_dtype(ctx), qlora=ctx.spec.qlora, scratch=ctx.dir,
                               attention=loading.packed_attention(args))

    # ---- train ----------------------------------------------------------------------------------------------------
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
    return report.finish(ctx, trainer, output, tokenizer, tokenizer.chat_template)
