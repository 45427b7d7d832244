"""The `agent` eval tasks: a shipped environment's held-out problems run through the model as episodes of the same
tool loop GRPO trains in — generate, take the calls, run them on the environment's tools, hand the results back,
generate again, up to MAX_TURNS — in-process or through a live OpenAI-compatible server (`llmstack serve`).

Two tasks, one per shipped environment (ENVIRONMENTS): `agent` (lookup: questions answerable only by searching a local
corpus) and `agent_calculator` (held-out GSM8K word problems with a calculator tool).

Per episode: `success` (the environment's judgement: its `get_reward()` when it has one, else the final answer's
number against the gold `#### N`, as grpo's gsm8k_answer reward), `tool_calls`, `invalid_calls` (an unknown tool or
bad arguments, plus the calls the environment's tools rejected: its `invalid` count) and `turns`. The task reports
the success rate with its Wilson interval (llmstack/eval/stats.py) and the means of the others.

In-process, the model's text is parsed for `<tool_call>` blocks with llmstack.tools.parse_calls (the rendering
training used). Through a server, the official `openai` client sends the tools and reads the message's `tool_calls`
— the client-side tool loop an application runs — so the server's own call parsing, constrained decoding and guard
are part of what is scored; `tool_choice: required` (the target's) forces a call on an episode's first turn.

A hand-written loop rather than TRL's: TRL's lives inside GRPOTrainer's rollout, and scoring must not need a trainer.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmstack import tools as T
from llmstack.eval.answers import final_number, same_number
from llmstack.eval.environments import calculator, lookup

log = logging.getLogger("llmstack")

TASK = "agent"
PRIMARY = "success"
MAX_TURNS = 4
MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class Environment:
    factory: Callable[[], Any]  # a fresh environment per episode
    held_out: Callable[[], list[dict]]  # its held-out problems as `messages` rows (question, gold answer)


# task name -> the environment its episodes run in
ENVIRONMENTS: dict[str, Environment] = {
    "agent": Environment(lookup.Lookup, lambda: lookup.problems("held_out")),
    "agent_calculator": Environment(calculator.Calculator, lambda: calculator.problems("held_out")),
}


@dataclass
class Turn:
    """One model turn of an episode: the assistant message to append to the history, and its calls as
    {"name", "arguments": dict | raw text, "id"} (arguments that are not a JSON object stay text: an invalid call)."""

    message: dict
    calls: list[dict]
    text: str  # what the final answer is read from
    refused: str | None = None  # the server's error when it refused the turn


# One round of turns for a batch of episodes: ([(messages, tool specs)], first turn) -> their turns, in order. The
# episodes run in lockstep, so a model generates a round as one batch.
Step = Callable[[list[tuple[list[dict], list[dict]]], bool], list[Turn]]


def tool_specs(env) -> dict[str, tuple[Callable, dict]]:
    """{name: (bound method, JSON schema)} of an environment instance's tools, as TRL lists them."""
    from transformers.utils import get_json_schema

    return {n: (getattr(env, n), get_json_schema(getattr(env, n)))
            for n, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
            if n not in ("reset", "get_reward") and not n.startswith("_")}


def _turn(messages: list[dict], content: str | None, calls: list[dict], text: str) -> Turn:
    """The Turn of an in-process answer: its calls get ids, as a server's would."""
    calls = [{**c, "id": f"call_{len(messages)}_{i}"} for i, c in enumerate(calls)]
    message = {"role": "assistant", "content": content or ""}
    if calls:
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
    return Turn(message, calls, text)


def text_step(generate: Callable[[list[dict], list[dict]], str]) -> Step:
    """A Step over a policy that writes text ((messages, tool specs) -> the assistant's text), one episode at a time:
    its calls are parsed from the text."""

    def step(batch: list[tuple[list[dict], list[dict]]], first: bool) -> list[Turn]:
        turns = []
        for messages, specs in batch:
            text = generate(messages, specs)
            content, calls = T.parse_calls(text, specs)
            turns.append(_turn(messages, content, calls, text))
        return turns

    return step


@dataclass
class _Episode:
    env: Any
    messages: list[dict]
    gold: str
    specs: dict[str, tuple[Callable, dict]]
    calls: int = 0
    invalid: int = 0
    turns: int = 0
    text: str = ""
    done: bool = False
    refused: list[str] = field(default_factory=list)  # the server's errors for the turns it refused

    @property
    def schemas(self) -> list[dict]:
        return [s for _, s in self.specs.values()]

    def take(self, turn: Turn) -> None:
        """Apply one model turn: no calls ends the episode; else each call runs on the environment's tools."""
        self.turns += 1
        self.text = turn.text
        if turn.refused:
            self.refused.append(turn.refused)
        if not turn.calls:
            self.done = True
            return
        self.messages = self.messages + [turn.message]
        for call in turn.calls:
            self.calls += 1
            try:
                T.check_call(call, self.schemas)  # arguments that are not a JSON object included
                result = str(self.specs[call["name"]][0](**call["arguments"]))
            except Exception as exc:  # noqa: BLE001 - a bad call is the model's mistake, recorded, never a crash
                self.invalid += 1
                result = f"error: {exc}"
            self.messages = self.messages + [{"role": "tool", "tool_call_id": call["id"], "name": call["name"],
                                              "content": result}]

    def record(self) -> dict[str, Any]:
        if callable(getattr(self.env, "get_reward", None)):
            success = float(self.env.get_reward())
        else:
            success = float(same_number(final_number(self.gold), final_number(self.text or "")))
        # the environment counts the calls its tools rejected (a malformed expression, a search that found nothing)
        invalid = self.invalid + getattr(self.env, "invalid", 0)
        return {"success": success, "tool_calls": self.calls, "invalid_calls": invalid, "turns": self.turns,
                "final": self.text, "refused": self.refused}


def run_episodes(envs: list, rows: list[dict], step: Step, max_turns: int = MAX_TURNS) -> list[dict[str, Any]]:
    """Every problem through the loop, the episodes in lockstep (one round of turns at a time): each episode's record
    and its final text."""
    episodes = []
    for env, row in zip(envs, rows):
        messages, gold = row["messages"][:-1], row["messages"][-1]["content"]
        env.reset(answer=gold)
        episodes.append(_Episode(env, messages, gold, tool_specs(env)))
    for round_ in range(max_turns):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        for episode, turn in zip(active, step([(e.messages, e.schemas) for e in active], round_ == 0)):
            episode.take(turn)
    return [e.record() for e in episodes]


def score(rows: list[dict], env_factory: Callable, step: Step | Callable[[list[dict], list[dict]], str],
          samples: Path | None = None) -> dict[str, Any]:
    """Every row an episode in a fresh environment: {"score", "metric", "n", "all", "ci95", "items"} as
    llmstack.eval.run reports a task. `step` may also be a text policy ((messages, specs) -> text)."""
    from llmstack.eval.stats import wilson

    if "first" not in inspect.signature(step).parameters:
        step = text_step(step)
    episodes = run_episodes([env_factory() for _ in rows], rows, step)
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


def hf_step(target, max_new_tokens: int = MAX_NEW_TOKENS) -> Step:
    """Greedy turns from a model folder (+ LoRA adapter) in-process, with its tool template (the rendering training
    used): the tool_calls task's batched transformers answerer, one batch per round."""
    from llmstack.eval.tool_calls import hf_answerer

    answer, warm = hf_answerer(target.model, target.adapter, batch_size=target.batch_size,
                               max_new_tokens=max_new_tokens)

    def step(batch: list[tuple[list[dict], list[dict]]], first: bool) -> list[Turn]:
        warm([{"messages": m, "tools": t} for m, t in batch])
        turns = []
        for messages, specs in batch:
            a = answer(messages, specs)
            turns.append(_turn(messages, a["content"], a["calls"], a["text"]))
        return turns

    return step


def server_step(target, max_new_tokens: int = MAX_NEW_TOKENS) -> Step:
    """Turns from a live OpenAI-compatible server with the official client, greedy, one call per turn, a round's
    requests `target.batch_size` at a time. The history goes back in the wire shape (arguments as JSON text, tool
    turns answering a `tool_call_id`). A turn the server refuses ends its episode as a turn without calls, the refusal
    recorded."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(base_url=target.base_url.rstrip("/") + "/v1", api_key=target.api_key or "none",
                           max_retries=2, timeout=600)

    def wire(m: dict) -> dict:
        if not m.get("tool_calls"):
            return m
        return {**m, "tool_calls": [{**c, "function": {**c["function"],
                                                       "arguments": _as_text(c["function"]["arguments"])}}
                                    for c in m["tool_calls"]]}

    def one(messages: list[dict], specs: list[dict], first: bool) -> Turn:
        try:
            r = client.chat.completions.create(
                model=target.served_name, messages=[wire(m) for m in messages], tools=specs, temperature=0,
                tool_choice=target.tool_choice if first else "auto", max_tokens=max_new_tokens,
                parallel_tool_calls=False)
        except openai.BadRequestError as exc:
            log.warning("agent: the server refused a turn: %s", exc.message)
            return Turn({"role": "assistant", "content": ""}, [], "", refused=exc.message)
        m = r.choices[0].message
        calls = [{"id": c.id, "name": c.function.name, "arguments": _as_object(c.function.arguments)}
                 for c in m.tool_calls or []]
        message = {"role": "assistant", "content": m.content or ""}
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                     for c in m.tool_calls]
        return Turn(message, calls, m.content or "")

    def step(batch: list[tuple[list[dict], list[dict]]], first: bool) -> list[Turn]:
        with ThreadPoolExecutor(max(1, min(target.batch_size, len(batch)))) as pool:
            return list(pool.map(lambda b: one(b[0], b[1], first), batch))

    return step


def _as_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _as_object(arguments: str) -> dict | str:
    try:
        value = json.loads(arguments)
    except (TypeError, ValueError):
        return arguments
    return value if isinstance(value, dict) else arguments


def read_items(task: str = TASK) -> list[dict]:
    return [{"id": f"{task}-{i}", **row} for i, row in enumerate(ENVIRONMENTS[task].held_out())]


def item_text(doc: dict) -> str:
    """What could leak into training: the question and its gold answer."""
    return " ".join(m["content"] for m in doc["messages"])


def evaluate_target(target, n: int | None, samples_dir: Path | None = None, task: str = TASK) -> dict[str, Any]:
    """Score a llmstack.eval.run.Target on the first `n` held-out problems of the task's environment: a model folder
    (+ adapter) in-process, or a live server (backend `server`) through the official client."""
    step = server_step(target) if target.backend == "server" else hf_step(target)
    rows = read_items(task)[:n] if n else read_items(task)
    return score(rows, ENVIRONMENTS[task].factory, step, samples_dir / f"{task}.jsonl" if samples_dir else None)
