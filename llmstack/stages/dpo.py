"""Pipeline stage `dpo`: preference optimisation on `prompt` / `chosen` / `rejected` conversations with TRL's
DPOTrainer.

The family of objectives is DPOConfig's `loss_type` (a list; several are summed with `loss_weights`): sigmoid (DPO),
ipo, hinge, robust, exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft
(mixing in an SFT term, as in RPO/MPO), sigmoid_norm. ORPO / CPO / SimPO / KTO are separate trainers in TRL 1.16
(KTO wants unpaired data; the others live in trl.experimental) and are not offered here.

With LoRA the reference model is the same weights with the adapter switched off (no second copy in memory); with a
full fine-tune TRL keeps a frozen copy of the input model.
"""

from __future__ import annotations

from llmstack.stage import StageContext, StageResult
from llmstack.train import checkpoints, loading, report, setup, templates

DPO_DEFAULTS = {
    "max_length": 1024,
    "beta": 0.1,
}


def run(ctx: StageContext) -> StageResult:
    from datasets import load_from_disk
    from trl import DPOTrainer

    # ---- load -----------------------------------------------------------------------------------------------------
    args = setup.trainer_config(ctx, DPO_DEFAULTS)
    tokenizer = loading.load_tokenizer(ctx.model)
    data = load_from_disk(str(ctx.datasets[ctx.spec.dataset]))
    first = data["train"][0]
    rendered = tokenizer.apply_chat_template(first["prompt"] + first["chosen"], tokenize=False)
    templates.check_single_bos(tokenizer, rendered)
    model = loading.load_model(ctx.model, loading.weights_dtype(ctx), qlora=ctx.spec.qlora, scratch=ctx.dir)

    # ---- train ----------------------------------------------------------------------------------------------------
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data["train"],
        eval_dataset=setup.eval_split(data, args),
        processing_class=tokenizer,
        peft_config=loading.peft_config(ctx.spec),
    )
    output = trainer.train(resume_from_checkpoint=checkpoints.resume_checkpoint(ctx, trainer))

    # ---- save -----------------------------------------------------------------------------------------------------
    return report.finish(ctx, trainer, output, tokenizer, tokenizer.chat_template,
                         curve_keys=("loss", "rewards/margins", "rewards/accuracies"))
