"""Pipeline stage `online_dpo`: online DPO with TRL's OnlineDPOTrainer — sample two completions per prompt from the
current policy, let the recipe's reward functions pick the better one, and take a DPO step on that fresh pair.

The judge: TRL's OnlineDPOTrainer takes either a pairwise judge (PairRM, or an LLM behind a hosted API: both need the
network or weights from a hub) or reward functions. llmstack uses the reward functions, through grpo's `rewards:`
block (stages/grpo.py): a rule verifier, a Python function, or the model a `reward` stage of the same recipe trained
(`{type: reward_model, stage: reward}`). That runs offline and is the same block a grpo/rloo stage takes; the
higher-scored completion of each pair is `chosen`.

Data: a `messages` dataset, split into prompt and reference answer as grpo splits it. The trainer is in
`trl.experimental.online_dpo` (TRL 1.16): upstream may change or remove it in any release, so llmstack pins the TRL
version it is tested with (the lock) and the docs' method table marks the kind experimental.
"""

from __future__ import annotations

import os

from llmstack.stage import StageContext, StageResult
from llmstack.stages.grpo import reward_functions
from llmstack.train import checkpoints, loading, report, rewards, setup

ONLINE_DPO_DEFAULTS = {
    "max_new_tokens": 128,
    "max_length": 1024,
    "per_device_train_batch_size": 2,
    "learning_rate": 5e-7,
    "use_vllm": False,
}


def run(ctx: StageContext) -> StageResult:

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # experimental upstream: said in the docs, not per run
    from trl.experimental.online_dpo import OnlineDPOTrainer

    # ---- load: grpo's rewards and prompt rows -----------------------------------------------------------------------
    funcs, reward_tokenizers, weights = reward_functions(ctx)
    args = setup.trainer_config(ctx, {**ONLINE_DPO_DEFAULTS, "reward_weights": weights})
    tokenizer, data = rewards.prompt_rows(ctx, args)
    model = rewards.policy_model(ctx, tokenizer)

    # ---- train ----------------------------------------------------------------------------------------------------
    trainer = OnlineDPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=data["train"],
        eval_dataset=setup.eval_split(data, args),
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizers,
        peft_config=loading.peft_config(ctx.spec),
    )
    output = trainer.train(resume_from_checkpoint=checkpoints.resume_checkpoint(ctx, trainer))

    # ---- save + report: the reward of the sampled completions, per step ---------------------------------------------
    per_step = [round(float(h["objective/scores"]), 5) for h in trainer.state.log_history if "objective/scores" in h]
    scores = {"score_first": per_step[0] if per_step else None, "score_last": per_step[-1] if per_step else None,
              "score_per_step": per_step}
    return report.finish(ctx, trainer, output, tokenizer, tokenizer.chat_template, extra_metrics=scores,
                         curve_keys=("objective/scores", "loss", "rewards/margins"))
