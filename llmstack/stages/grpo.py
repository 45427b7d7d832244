"""Pipeline stage `grpo`: online RL with TRL's GRPOTrainer — sample `num_generations` completions per prompt, score them
with the recipe's reward functions, and push the policy towards the completions that beat their group's mean.

Data: a `messages` dataset. Each row's turns before its last assistant turn are the prompt (system + user turns, as
the model is served); that last assistant turn's text is the reference answer (column `answer`) the verifiers compare
against (GSM8K's answers end in '#### 72'). Rows without an assistant turn are prompts with no reference.

Rewards (`rewards:` in the stage, see config.RewardSpec): rule-based verifiers (llmstack/train/rewards.py),
the reward model an earlier `reward` stage trained (found through the run manifest: see reward_model_path), or any
function with TRL's reward signature (`python`). TRL sums them with their weights.

A model whose chat template thinks (an sft stage on thinking rows saved llmstack's reasoning template): TRL parses
each completion into thinking and answer (llmstack/train/thinking.py `parse_completions`), and the rewards score the
answer alone.

Tools and environments (`tools:` / `environment:`, an agent stage): TRL's own multi-turn rollouts (its `tools` /
`environment_factory`), with the recipe's tools and environment wrapped in one guarded environment class
(llmstack/train/agents.py) that enforces `tool_limits` and counts the episodes a bad tool ended (metric
`episode_failures`). The chat template is llmstack's one tool format (llmstack/tools.py), and TRL parses the calls with
its response template.

Generation: transformers `generate` by default (works on CPU). TRL's vLLM generation is `args.use_vllm: true`
(`vllm_mode: colocate` on one GPU); it needs CUDA, so the stage refuses it on a CPU-only machine.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from llmstack.stage import StageContext, StageResult
from llmstack.train import agents, checkpoints, loading, report, rewards, setup

# Small enough that a CPU step takes seconds on a tiny model and ~a minute on SmolLM2-135M; a GPU recipe raises them.
GRPO_DEFAULTS = {
    "num_generations": 4,
    "per_device_train_batch_size": 4,  # = one prompt x 4 completions per step
    "max_completion_length": 128,
    "learning_rate": 1e-6,
    "use_vllm": False,
    "log_completions": False,
}


def reward_model_path(ctx: StageContext, stage: str) -> Path:
    """The reward stage's model folder, from its manifest entry (outputs.reward_model), else its stage folder."""
    entry = ctx.run.entry(stage) or {}
    path = (entry.get("outputs") or {}).get("reward_model", {}).get("path")
    folder = Path(path) if path else ctx.run.dir / stage / "model"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"stage {ctx.name}: no reward model from stage '{stage}' at {folder}; run that stage "
                                f"first (`llmstack run <recipe> --only {stage}`)")
    return folder


def reward_functions(ctx: StageContext) -> tuple[list, list, list[float]]:
    """(reward_funcs, reward_processing_classes, weights) for GRPOTrainer, from the stage's `rewards`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    funcs, tokenizers, weights = [], [], []
    for r in ctx.spec.rewards:
        tok = None
        if r.type == "gsm8k_answer":
            fn = rewards.gsm8k_answer
        elif r.type == "format":
            fn = rewards.format_reward(r.pattern, r.full)
        elif r.type == "reward_model":
            folder = reward_model_path(ctx, r.stage)
            fn = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
            tok = AutoTokenizer.from_pretrained(folder)
        else:
            module, name = r.function.split(":")
            fn = getattr(importlib.import_module(module), name)
        funcs.append(fn)
        # TRL wants a tokenizer slot per function; for a callable it is ignored, for a model it must be the model's own
        tokenizers.append(tok)
        weights.append(r.weight)
    return funcs, tokenizers, weights


def agent_setup(ctx: StageContext, tokenizer) -> dict:
    """GRPOTrainer's `environment_factory` for an agent stage, with the tokenizer switched to the tool format (our
    template renders the tool specs, calls and results; TRL's response template parses the calls back)."""
    from llmstack import tools

    tokenizer.chat_template = tools.template_for(tokenizer)
    tokenizer.response_template = tools.response_template()
    return {"environment_factory": agents.build_environment(ctx.spec.tools, ctx.spec.environment,
                                                            ctx.spec.tool_limits)}


# ---------------------------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------------------------


def run(ctx: StageContext) -> StageResult:
    from trl import GRPOTrainer

    # ---- load -----------------------------------------------------------------------------------------------------
    funcs, reward_tokenizers, weights = reward_functions(ctx)
    # no weights when the environment is the only reward source: TRL appends its get_reward with weight 1
    args = setup.trainer_config(ctx, {**GRPO_DEFAULTS, "reward_weights": weights or None})
    tokenizer, data = rewards.prompt_rows(ctx, args)  # rewards read the answer, not a reasoning model's thinking
    agent = {}
    if ctx.spec.tools or ctx.spec.environment:
        agent = agent_setup(ctx, tokenizer)
        args.max_tool_calling_iterations = ctx.spec.tool_limits.max_turns
    model = rewards.policy_model(ctx, tokenizer)

    # ---- train ----------------------------------------------------------------------------------------------------
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=data["train"],
        eval_dataset=setup.eval_split(data, args),
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizers,
        peft_config=loading.peft_config(ctx.spec),
        **agent,
    )
    output = trainer.train(resume_from_checkpoint=checkpoints.resume_checkpoint(ctx, trainer))

    # ---- save + report (with the reward curve in the metrics) ------------------------------------------------------
    history = trainer.state.log_history
    rewards_seen = rewards.reward_curve(trainer)
    if agent:
        rewards_seen["episode_failures"] = agent["environment_factory"].failures.summary()
        calls = [h["tools/call_frequency"] for h in history if "tools/call_frequency" in h]
        rewards_seen["tool_calls_per_episode_last"] = round(float(calls[-1]), 5) if calls else None
    return report.finish(ctx, trainer, output, tokenizer, tokenizer.chat_template, extra_metrics=rewards_seen,
                         curve_keys=("reward", "reward_std", "loss"))
