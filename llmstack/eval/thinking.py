"""Evaluating reasoning models: generation tasks scored on the answer alone, with thinking on, off or capped at a
budget, and the tokens spent on each.

lm-eval 0.4.13's own model classes carry the reasoning switches: `chat_template_args={"enable_thinking": ...}`
renders the prompt with the template's thinking on or off, and `think_end_token` drops everything up to the last
`</think>` of a generation before the task's filters see it. llmstack uses both (no stripper of its own). What lm-eval
has no switch for is a thinking budget, and its single-pass generation cannot serve thinking either way: a task's stop
sequences (gsm8k's "\\n\\n", "Question:") also fire inside the thinking, and only the stripped answer comes back, so
the tokens spent thinking are lost. So a thinking model generates in two passes through the same lm-eval model
(`ThinkingLM`, mixed into lm-eval's `hf` / `vllm` class):

1. the thinking: the rendered prompt (which opens `<think>`), generated until `</think>` or the budget (`on`: the
   task's own max_gen_toks), greedy as the task asks;
2. the answer: prompt + thinking + `\\n</think>\\n\\n` (the block closed exactly as the template renders a trained
   turn), generated with the task's own stop sequences and limit, and `think_end_token` set in case the answer opens
   another block.

Budget 0 skips pass 1: the prompt then ends `<think>\\n\\n</think>\\n\\n`, the template's own `enable_thinking:
false` rendering, so `off` and `budget:0` are the same evaluation. A template without thinking (rendering the same
with enable_thinking true or false) is evaluated in one pass in every mode.

Tokens spent per item (thinking, answer) are counted by re-tokenizing each pass's text (without special tokens), so a
merge across the pass boundary can move a count by one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

THINK_END = "</think>"
CLOSE = "\n" + THINK_END + "\n\n"


def template_thinks(tokenizer) -> bool:
    """Whether the tokenizer's chat template has a thinking switch: a generation prompt that renders differently with
    enable_thinking true and false (Qwen3-style templates, llmstack's reasoning template)."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    chat = [{"role": "user", "content": "2+2?"}]
    on, off = (tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=flag)
               for flag in (True, False))
    return on != off


class ThinkingLM:
    """Mixed in before an lm-eval model class (`with_thinking`). `budget`: None = one pass, as lm-eval generates (a
    template without thinking, or thinking off); an int = two passes with at most that many thinking tokens (-1: the
    task's own limit). `spent` maps (task, doc id) -> (thinking tokens, answer tokens) of the last evaluation."""

    budget: int | None = None
    render_thinking: bool | None = None  # enable_thinking for the chat template (None: the template's default)
    spent: dict[tuple[str, int], tuple[int, int]]

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        # lm-eval's switch, set only while rendering: lm-eval refuses loglikelihood tasks on a model whose own
        # `enable_thinking` is set, and a suite may mix them with generation tasks.
        if self.render_thinking is None:
            return super().apply_chat_template(chat_history, add_generation_prompt)
        if hasattr(self, "hf_chat_template"):  # vLLM passes `enable_thinking=self.enable_thinking` itself
            saved, self.enable_thinking = self.enable_thinking, self.render_thinking
            try:
                return super().apply_chat_template(chat_history, add_generation_prompt)
            finally:
                self.enable_thinking = saved
        saved_args = self.chat_template_args
        self.chat_template_args = {**saved_args, "enable_thinking": self.render_thinking}
        try:
            return super().apply_chat_template(chat_history, add_generation_prompt)
        finally:
            self.chat_template_args = saved_args

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not hasattr(self, "spent"):
            self.spent = {}
        if self.budget is None:
            answers = super().generate_until(requests, disable_tqdm)
            thoughts = [""] * len(requests)
        else:
            thoughts = self._think(requests, disable_tqdm)
            closed = [replace(r, arguments=(r.args[0] + t.strip("\n") + CLOSE, *r.args[1:]))
                      for r, t in zip(requests, thoughts)]
            answers = super().generate_until(closed, disable_tqdm)
        for r, thought, answer in zip(requests, thoughts, answers):
            self.spent[(r.task_name, r.doc_id)] = (self._count(thought), self._count(answer))
        return answers

    def _think(self, requests, disable_tqdm: bool) -> list[str]:
        """Pass 1: each prompt's thinking, up to `</think>` or the budget (the task's max_gen_toks when -1)."""
        from lm_eval.models.utils import normalize_gen_kwargs

        if self.budget == 0:
            return [""] * len(requests)
        firsts = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1])
            cap = normalize_gen_kwargs(dict(kwargs), self.max_gen_toks)["max_gen_toks"]
            for alias in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
                kwargs.pop(alias, None)
            kwargs.update(until=[THINK_END], max_gen_toks=cap if self.budget < 0 else self.budget)
            firsts.append(replace(r, arguments=(context, kwargs)))
        # the thinking itself must come back: lm-eval's think_end_token would keep only what follows `</think>`
        end, self.think_end_token = self.think_end_token, None
        try:
            return super().generate_until(firsts, disable_tqdm)
        finally:
            self.think_end_token = end


def with_thinking(model_cls: type, args: dict[str, Any], budget: int | None) -> Any:
    """An lm-eval model of `model_cls` (its `hf` or `vllm` class) built from `args`, generating as `budget` says
    (eval.thinking parsed: None = on, 0 = off, N = budget) when its chat template thinks; one pass otherwise."""
    cls = type(f"Thinking{model_cls.__name__}", (ThinkingLM, model_cls), {})
    lm = cls.create_from_arg_obj({**args, "think_end_token": THINK_END})
    if template_thinks(lm.tokenizer):
        lm.render_thinking = budget != 0
        lm.budget = -1 if budget is None else budget if budget > 0 else None
    lm.spent = {}
    return lm


def token_summary(spent: dict[tuple[str, int], tuple[int, int]], task: str, n: int) -> dict[str, Any] | None:
    """Per-item and mean tokens a task's items spent (doc order): thinking, answer and their total."""
    rows = [spent[(task, i)] for i in range(n) if (task, i) in spent]
    if not rows:
        return None
    thinking, answer = [t for t, _ in rows], [a for _, a in rows]
    return {"thinking_mean": round(sum(thinking) / len(rows), 1), "answer_mean": round(sum(answer) / len(rows), 1),
            "total_mean": round((sum(thinking) + sum(answer)) / len(rows), 1),
            "thinking": thinking, "answer": answer}
