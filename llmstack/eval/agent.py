"""The `agent` eval task: a shipped environment's held-out problems run through the model in-process, as episodes of
the same tool loop GRPO trains in (generate, parse the `<tool_call>` blocks with llmstack.tools.parse_calls, call the
environment's tools, render the results with the model's tool template, generate again, up to MAX_TURNS).

Per episode: `success` (the environment's judgement: its `get_reward()` when it has one, else the final answer's
number against the gold `#### N`, as grpo's gsm8k_answer reward), `tool_calls`, `invalid_calls` (an unknown tool or
bad arguments, plus the calls the environment's tools rejected: its `invalid` count) and `turns`. The task reports
the success rate with its Wilson interval (llmstack/eval/stats.py) and the means of the others. Its items are the
lookup environment's held-out questions (self-contained: no data to prepare).

A hand-written loop rather than TRL's: TRL's lives inside GRPOTrainer's rollout, and scoring must not need a trainer.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmstack import tools as T
from llmstack.eval.answers import final_number, same_number
from llmstack.eval.environments import lookup

TASK = "agent"
PRIMARY = "success"
MAX_TURNS = 4
MAX_NEW_TOKENS = 128
Generate = Callable[[list[dict], list[dict]], str]  # (messages, tool specs) -> the assistant's text


def tool_specs(env) -> dict[str, tuple[Callable, dict]]:
    """{name: (bound method, JSON schema)} of an environment instance's tools, as TRL lists them."""
    from transformers.utils import get_json_schema

    return {n: (getattr(env, n), get_json_schema(getattr(env, n)))
            for n, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
            if n not in ("reset", "get_reward") and not n.startswith("_")}


def run_episode(env, row: dict, generate: Generate, max_turns: int = MAX_TURNS) -> dict[str, Any]:
    """One problem through the loop: the episode's record and its final text."""
    messages, gold = row["messages"][:-1], row["messages"][-1]["content"]
    env.reset(answer=gold)
    specs = tool_specs(env)
    schemas = [s for _, s in specs.values()]
    calls = invalid = turns = 0
    text = ""
    while turns < max_turns:
        turns += 1
        text = generate(messages, schemas)
        content, parsed = T.parse_calls(text, schemas)
        if not parsed:
            break
        messages = messages + [{"role": "assistant", "content": content or "",
                                "tool_calls": [{"type": "function", "function": c} for c in parsed]}]
        for call in parsed:
            calls += 1
            try:
                T.check_call(call, schemas)
                result = str(specs[call["name"]][0](**call["arguments"]))
            except Exception as exc:  # noqa: BLE001 - a bad call is the model's mistake, recorded, never a crash
                invalid += 1
                result = f"error: {exc}"
            messages = messages + [{"role": "tool", "name": call["name"], "content": result}]
    if callable(getattr(env, "get_reward", None)):
        success = float(env.get_reward())
    else:
        success = float(same_number(final_number(gold), final_number(text or "")))
    # the environment counts the calls its tools rejected (a malformed expression, a search that found nothing)
    invalid += getattr(env, "invalid", 0)
    return {"success": success, "tool_calls": calls, "invalid_calls": invalid, "turns": turns, "final": text}


def score(rows: list[dict], env_factory: Callable, generate: Generate, samples: Path | None = None) -> dict[str, Any]:
    """Every row an episode in a fresh environment: {"score", "metric", "n", "all", "ci95", "items"} as
    llmstack.eval.run reports a task."""
    from llmstack.eval.stats import wilson

    episodes = [run_episode(env_factory(), row, generate) for row in rows]
    if samples is not None:
        samples.parent.mkdir(parents=True, exist_ok=True)
        samples.write_text("".join(json.dumps({"doc": r, **e}, ensure_ascii=False) + "\n"
                                   for r, e in zip(rows, episodes)))
    n = len(episodes)
    means = {m: (sum(e[m] for e in episodes) / n if n else None)
             for m in ("success", "tool_calls", "invalid_calls", "turns")}
    wins = [e["success"] for e in episodes]
    return {"score": means[PRIMARY], "metric": PRIMARY, "n": n, "chat": True, "all": means,
            "ci95": [round(x, 4) for x in wilson(sum(wins), n)] if n else None, "items": wins}


def hf_generate(model_dir: Path, max_new_tokens: int = MAX_NEW_TOKENS) -> Generate:
    """Greedy generation from a model folder with its tool template (the rendering training used)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    template = T.template_for(tok)

    def generate(messages: list[dict], specs: list[dict]) -> str:
        prompt = tok.apply_chat_template(messages, tools=specs or None, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    return generate


def read_items() -> list[dict]:
    return [{"id": f"lookup-{i}", **row} for i, row in enumerate(lookup.problems("held_out"))]


def item_text(doc: dict) -> str:
    """What could leak into training: the question and its gold answer."""
    return " ".join(m["content"] for m in doc["messages"])


def evaluate_target(target, n: int | None, samples_dir: Path | None = None) -> dict[str, Any]:
    """Score a llmstack.eval.run.Target's model folder (in-process) on the first `n` held-out problems."""
    if target.backend == "server" or target.adapter is not None:
        raise ValueError("the agent task runs a merged model folder in-process; use the hf backend")
    rows = read_items()[:n] if n else read_items()
    return score(rows, lookup.Lookup, hf_generate(target.model), samples_dir / f"{TASK}.jsonl" if samples_dir else None)
