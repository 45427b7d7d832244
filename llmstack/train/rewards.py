"""Rewards for RL and reward models: rule-based verifiers with TRL's reward signature (the grpo stage sums them with
their weights), and scoring with a trained reward model (the reward stage's validation, and tests).
"""

from __future__ import annotations

import re
from pathlib import Path

from llmstack.eval.answers import final_number, same_number  # noqa: F401 (final_number re-exported)

# ---------------------------------------------------------------------------------------------------------------------
# Data: messages rows -> prompt + reference answer
# ---------------------------------------------------------------------------------------------------------------------


def to_prompt(row: dict) -> dict:
    msgs = row["messages"]
    if msgs and msgs[-1]["role"] == "assistant":
        return {"prompt": msgs[:-1], "answer": msgs[-1]["content"]}
    return {"prompt": msgs, "answer": ""}


def prompt_rows(ctx, args):
    """(tokenizer, prompt rows) of an online RL stage (grpo, rloo, online_dpo): the stage's dataset split into prompt
    and reference answer, and a tokenizer whose thinking (a reasoning template) rewards do not see."""
    import torch
    from datasets import load_from_disk

    from llmstack.train import loading, thinking

    if args.use_vllm and not torch.cuda.is_available():
        raise ValueError(f"stage {ctx.name}: args.use_vllm needs a CUDA GPU (TRL's vLLM generation); on this machine "
                         f"leave it false and generation runs through transformers")
    tokenizer = loading.load_tokenizer(ctx.model)
    thinking.parse_completions(tokenizer)
    data = load_from_disk(str(ctx.datasets[ctx.spec.dataset]))
    return tokenizer, data.map(to_prompt, remove_columns=data["train"].column_names)


def policy_model(ctx, tokenizer):
    """The model an online RL stage samples from and trains; generate() stops at the end of the assistant turn only
    if the generation config says so."""
    from llmstack.train import loading

    model = loading.load_model(ctx.model, loading.weights_dtype(ctx), qlora=ctx.spec.qlora, scratch=ctx.dir)
    model.generation_config.eos_token_id = model.generation_config.eos_token_id or tokenizer.eos_token_id
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Rule-based rewards (TRL's signature: prompts, completions, **dataset columns -> one float per completion)
# ---------------------------------------------------------------------------------------------------------------------


def _text(completion) -> str:
    """A conversational completion is [{"role": "assistant", "content": ...}]; a plain one is a string."""
    return completion[0]["content"] if isinstance(completion, list) else completion


def gsm8k_answer(prompts, completions, answer, **_) -> list[float]:
    return [1.0 if same_number(final_number(ref or ""), final_number(_text(completion))) else 0.0
            for completion, ref in zip(completions, answer)]


def format_reward(pattern: str, full: bool):
    regex = re.compile(pattern, re.DOTALL)
    check = regex.fullmatch if full else regex.search

    def format_match(prompts, completions, **_) -> list[float]:
        return [1.0 if check(_text(c)) else 0.0 for c in completions]

    return format_match


def reward_peft_config(spec):
    """LoRA for a reward model: task_type SEQ_CLS makes PEFT train the (new, random) score head in full."""
    adapter = spec.lora
    if adapter is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=adapter.target_modules, task_type="SEQ_CLS")


def scores(model_dir: Path, conversations: list[list[dict]], batch_size: int = 8) -> list[float]:
    """Reward-model scores of whole conversations, rendered with the folder's chat template as TRL renders them."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    for i in range(0, len(conversations), batch_size):
        texts = [tok.apply_chat_template(c, tokenize=False) for c in conversations[i:i + batch_size]]
        batch = tok(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
        with torch.inference_mode():
            out += model(**batch).logits[:, 0].tolist()
    return out


def pairwise_accuracy(model_dir: Path, rows) -> float:
    """Fraction of preference rows where the model scores chosen above rejected (0.5 = chance)."""
    rows = list(rows)
    chosen = scores(model_dir, [r["prompt"] + r["chosen"] for r in rows])
    rejected = scores(model_dir, [r["prompt"] + r["rejected"] for r in rows])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(rows)


def reward_curve(trainer) -> dict:
    """The mean reward per logged step and each reward function's last mean, from the trainer's log (TRL's online
    trainers log `reward` and `rewards/<name>/mean`), for the stage's metrics."""
    history = trainer.state.log_history
    per_step = [round(float(h["reward"]), 5) for h in history if "reward" in h]
    seen = {"reward_first": per_step[0] if per_step else None, "reward_last": per_step[-1] if per_step else None,
            "reward_per_step": per_step}
    for name in trainer.reward_func_names:
        vals = [h[f"rewards/{name}/mean"] for h in history if f"rewards/{name}/mean" in h]
        if vals:
            seen[f"reward_{name}_last"] = round(float(vals[-1]), 5)
    return seen
