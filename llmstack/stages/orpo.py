"""Pipeline stage `orpo`: odds-ratio preference optimisation on `prompt` / `chosen` / `rejected` conversations with
TRL's ORPOTrainer — SFT on the chosen answer plus a log-odds-ratio penalty on the rejected one, in one stage and
without a reference model (so it can replace an sft + dpo pair, at one model's memory).

The trainer is in `trl.experimental.orpo` (TRL 1.16): upstream may change or remove it in any release, so llmstack
pins the TRL version it is tested with (the lock) and the docs' method table marks the kind experimental.
"""

from __future__ import annotations

import os

from llmstack.stage import StageContext, StageResult
from llmstack.train import checkpoints, loading, report, setup, templates

ORPO_DEFAULTS = {
    "max_length": 1024,
    "beta": 0.1,  # the odds-ratio term's weight (λ in the paper)
}


def run(ctx: StageContext) -> StageResult:
    from datasets import load_from_disk

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # experimental upstream: said in the docs, not per run
    from trl.experimental.orpo import ORPOTrainer

    # ---- load -----------------------------------------------------------------------------------------------------
    args = setup.trainer_config(ctx, ORPO_DEFAULTS)
    tokenizer = loading.load_tokenizer(ctx.model)
    data = load_from_disk(str(ctx.datasets[ctx.spec.dataset]))
    first = data["train"][0]
    templates.check_single_bos(tokenizer, tokenizer.apply_chat_template(first["prompt"] + first["chosen"],
                                                                        tokenize=False))
    model = loading.load_model(ctx.model, loading.weights_dtype(ctx), qlora=ctx.spec.qlora, scratch=ctx.dir)

    # ---- train ----------------------------------------------------------------------------------------------------
    trainer = ORPOTrainer(
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
                         curve_keys=("loss", "rewards/margins", "log_odds_ratio"))
