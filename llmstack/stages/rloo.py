"""Pipeline stage `rloo`: online RL with TRL's RLOOTrainer (REINFORCE Leave-One-Out) — sample `num_generations`
completions per prompt, score them with the recipe's reward functions, and use the mean reward of the *other*
completions of the same prompt as each one's baseline (no value model, like grpo; the baseline is unbiased).

Everything a recipe gives it is grpo's: a `messages` dataset split into prompt and reference answer, the same
`rewards:` (rule verifiers, a reward stage's model, a Python function; see stages/grpo.py), transformers generation on
CPU and TRL's vLLM generation where CUDA is (`args.use_vllm`).
"""

from __future__ import annotations

from llmstack.stage import StageContext, StageResult
from llmstack.stages.grpo import GRPO_DEFAULTS, reward_functions
from llmstack.train import checkpoints, loading, report, rewards, setup


def run(ctx: StageContext) -> StageResult:
    from trl import RLOOTrainer

    # ---- load: grpo's defaults, rewards and prompt rows ------------------------------------------------------------
    funcs, reward_tokenizers, weights = reward_functions(ctx)
    args = setup.trainer_config(ctx, {**GRPO_DEFAULTS, "reward_weights": weights})
    tokenizer, data = rewards.prompt_rows(ctx, args)
    model = rewards.policy_model(ctx, tokenizer)

    # ---- train ----------------------------------------------------------------------------------------------------
    trainer = RLOOTrainer(
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

    # ---- save + report ----------------------------------------------------------------------------------------------
    return report.finish(ctx, trainer, output, tokenizer, tokenizer.chat_template,
                         extra_metrics=rewards.reward_curve(trainer), curve_keys=("reward", "reward_std", "loss"))
