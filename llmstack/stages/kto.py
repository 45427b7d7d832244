"""Pipeline stage `kto`: Kahneman-Tversky optimisation on `unpaired` rows — a prompt, one completion, and whether it
is desirable — with TRL's KTOTrainer. Thumbs-up / thumbs-down feedback is this shape: no pairs are needed.

Data: an `unpaired` dataset (schema `unpaired`, from `kto` sources: LLaMA-Factory's kto_en_demo.json is one). KTO
pushes desirable completions up and undesirable ones down relative to a KL baseline, so it needs rows of both labels:
a curated dataset with only one is a recipe error naming the stage's dataset (checked before the model loads; it can
only be seen once curation has run). Unequal counts are fine: set `desirable_weight` / `undesirable_weight` in `args`
as TRL's warning suggests.

Like dpo: with LoRA the reference model is the adapter switched off, with a full fine-tune a frozen copy. The KL
baseline pairs each completion with another row's prompt inside a batch, so per_device_train_batch_size must be > 1.
"""

from __future__ import annotations

from llmstack.stage import StageContext, StageResult
from llmstack.train import checkpoints, loading, report, setup, templates

KTO_DEFAULTS = {
    "max_length": 1024,
    "beta": 0.1,
    "per_device_train_batch_size": 4,
}


def check_labels(ctx: StageContext, train) -> dict[str, int]:
    """Counts of desirable and undesirable rows; a recipe error when either is zero."""
    desirable = sum(bool(x) for x in train["label"])
    counts = {"desirable_rows": desirable, "undesirable_rows": len(train) - desirable}
    missing = [k.split("_")[0] for k, n in counts.items() if n == 0]
    if missing:
        raise setup.recipe_error(
            ctx, "dataset",
            f"the curated train split of data.datasets.{ctx.spec.dataset} has {counts['desirable_rows']} desirable "
            f"and {counts['undesirable_rows']} undesirable rows; KTO needs both. Add a source with "
            f"{missing[0]} rows (label: {'true' if missing[0] == 'desirable' else 'false'}), or train on the "
            f"desirable rows alone with an sft stage (a `messages` dataset of the same kto source)")
    return counts


def run(ctx: StageContext) -> StageResult:
    from datasets import load_from_disk
    from trl import KTOTrainer

    # ---- load -----------------------------------------------------------------------------------------------------
    data = load_from_disk(str(ctx.datasets[ctx.spec.dataset]))
    counts = check_labels(ctx, data["train"])
    args = setup.trainer_config(ctx, KTO_DEFAULTS)
    tokenizer = loading.load_tokenizer(ctx.model)
    first = data["train"][0]
    templates.check_single_bos(tokenizer, tokenizer.apply_chat_template(first["prompt"] + first["completion"],
                                                                        tokenize=False))
    model = loading.load_model(ctx.model, loading.weights_dtype(ctx), qlora=ctx.spec.qlora, scratch=ctx.dir)

    # ---- train ----------------------------------------------------------------------------------------------------
    trainer = KTOTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=setup.eval_split(data, args),
        processing_class=tokenizer,
        peft_config=loading.peft_config(ctx.spec),
    )
    output = trainer.train(resume_from_checkpoint=checkpoints.resume_checkpoint(ctx, trainer))

    # ---- save -----------------------------------------------------------------------------------------------------
    return report.finish(ctx, trainer, output, tokenizer, tokenizer.chat_template, extra_metrics=counts,
                         curve_keys=("loss", "rewards/margins", "kl"))
