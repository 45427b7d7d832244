"""Thinking (reasoning) traces in curated rows: one shape, whatever the source wrote.

A curated assistant message that thinks carries its trace as a string beside its answer, the field name chat
templates of reasoning models (Qwen3, DeepSeek-R1) and OpenAI-compatible servers use:

    {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "2 + 2 is 4."}

Sources write it three ways, all normalised here: an inline `<think>…</think>` block opening the assistant content,
LLaMA-Factory's content parts (`{"type": "reasoning", "value": …}` beside `text` and `tool_call` parts, as in its
`reason_tool_use_demo_50.jsonl`), and a `reasoning_content` field. An assistant message without thinking (or with an
empty block, as Qwen3 writes in non-thinking mode) carries no `reasoning_content` key, so rows without thinking are
unchanged. Anything ambiguous is a `BadRow` whose reason starts with `thinking:` (the card counts them).
"""

from __future__ import annotations

import json
import re
from typing import Any

from llmstack.data.turns import BAD_JSON, REASONING, BadRow

FIELD = REASONING
OPEN, CLOSE = "<think>", "</think>"
THINKING = "thinking"  # quarantine reasons for thinking start with this
# The turn lists of the canonical rows (messages; prompt/chosen/rejected; prompt/completion)
TURN_KEYS = ("messages", "prompt", "chosen", "rejected", "completion")
# Chat special tokens a trace must not spell: ChatML/Llama-3 style `<|…|>` markers and the think tags themselves. A
# trace that contains them would, once rendered by a chat template, end or reopen turns the model never saw.
SPECIAL_TOKEN = re.compile(r"<\|[^<>|\s]{1,64}\|>|</?think>")


def split_inline(content: str, where: str) -> tuple[str | None, str]:
    """(trace, answer) of a content that may open with `<think>…</think>`; (None, content) when it has no tags.
    The whitespace between the block and the answer is dropped."""
    if OPEN not in content and CLOSE not in content:
        return None, content
    stripped = content.lstrip()
    if not stripped.startswith(OPEN):
        if OPEN not in content:
            raise BadRow(f"{THINKING}: {where} has {CLOSE} without an opening {OPEN}")
        raise BadRow(f"{THINKING}: {where} has {OPEN} after its start (a think block must open the answer)")
    body = stripped[len(OPEN):]
    end = body.find(CLOSE)
    if end < 0:
        raise BadRow(f"{THINKING}: {where} has an unclosed {OPEN}")
    trace, answer = body[:end], body[end + len(CLOSE):]
    if OPEN in trace:
        raise BadRow(f"{THINKING}: {where} has a nested {OPEN}")
    if OPEN in answer or CLOSE in answer:
        raise BadRow(f"{THINKING}: {where} has a second think block (or a stray tag) after the first")
    return trace.strip(), answer.lstrip()


def _assistant(msg: dict, where: str) -> dict:
    field = msg.pop(FIELD, None)
    if field is not None and not isinstance(field, str):
        raise BadRow(f"{THINKING}: {where}.{FIELD} must be a string, got {type(field).__name__}")
    inline, answer = split_inline(msg["content"], where)
    if inline is not None and field and field.strip():
        raise BadRow(f"{THINKING}: {where} has a second think block (both {FIELD} and an inline {OPEN})")
    trace = (inline if inline is not None else field or "").strip()
    m = SPECIAL_TOKEN.search(trace)
    if m:
        raise BadRow(f"{THINKING}: {where} has a chat special token in its trace ({m.group()})")
    out = {"role": msg["role"], "content": answer}
    if trace:
        out[FIELD] = trace
    return {**out, **{k: v for k, v in msg.items() if k not in out}}


def _other(msg: dict, where: str) -> dict:
    if FIELD in msg:
        raise BadRow(f"{THINKING}: {where} is a {msg['role']} turn with {FIELD} (only assistant turns think)")
    if isinstance(msg.get("content"), str) and (OPEN in msg["content"] or CLOSE in msg["content"]):
        raise BadRow(f"{THINKING}: {where} is a {msg['role']} turn with a {OPEN} tag (only assistant turns think)")
    return msg


def normalise(row: dict) -> dict:
    """Every message of a canonical row (messages, prompt/chosen/rejected, prompt/completion) in the one thinking
    shape."""
    for key in TURN_KEYS:
        if key in row:
            row[key] = [(_assistant if m["role"] == "assistant" else _other)(m, f"{key}[{i}]")
                        for i, m in enumerate(row[key])]
    return row


def traces(row: dict) -> list[str]:
    """The thinking traces of a canonical row, in order."""
    return [m[FIELD] for key in TURN_KEYS for m in row.get(key, [])
            if m.get(FIELD)]


def has_thinking(row: dict) -> bool:
    return any(m.get(FIELD) for key in TURN_KEYS for m in row.get(key, []))


# ---------------------------------------------------------------- LLaMA-Factory content parts


def from_parts(turns: list) -> list:
    """LLaMA-Factory's content-part turns ({"role", "content": [{"type", "value"}, ...]}) as OpenAI-shaped turns:
    `text` parts joined into content, one `reasoning` part into reasoning_content, `tool_call` parts (JSON text
    {"name", "arguments"}) into tool_calls, and one tool turn answering parallel calls into one turn per call. Turns
    whose content is already a string pass through."""
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("content"), list):
            out.append(t)
            continue
        where = f"messages[{i}]"
        msg: dict[str, Any] = {k: v for k, v in t.items() if k != "content"}
        texts, reasoning, calls = [], [], []
        for j, part in enumerate(t["content"]):
            if not isinstance(part, dict) or not isinstance(part.get("value"), str):
                raise BadRow(f"malformed: {where}.content[{j}] must be an object with a string `value`")
            kind = part.get("type")
            if kind == "text":
                texts.append(part["value"])
            elif kind == "reasoning":
                reasoning.append(part["value"])
            elif kind == "tool_call":
                try:
                    call = json.loads(part["value"])
                except ValueError as exc:
                    raise BadRow(f"{BAD_JSON}: {where}.content[{j}] is not a JSON call ({exc})") from None
                if not isinstance(call, dict):
                    raise BadRow(f"malformed: {where}.content[{j}] must hold a call object")
                calls.append({"type": "function", "function": call})
            else:
                raise BadRow(f"malformed: {where}.content[{j}] has unsupported part type '{kind}'")
        if len(reasoning) > 1:
            raise BadRow(f"{THINKING}: {where} has a second think block ({len(reasoning)} reasoning parts)")
        msg["content"] = "".join(texts)
        if reasoning:
            msg[FIELD] = reasoning[0]
        if calls:
            msg["tool_calls"] = calls
        out += _split_results(msg, out[-1] if out else None)
    return out


def _split_results(msg: dict, before: Any) -> list[dict]:
    """LLaMA-Factory answers parallel calls with one tool turn whose text is a JSON list of results
    ([{"tool_call_id", "name", "content"}, ...], one per call, in order): as OpenAI turns, one tool turn per call.
    Its ids are the ones the calls had before LLaMA-Factory dropped them, so the results are matched by order."""
    n = len(before.get("tool_calls") or []) if isinstance(before, dict) and before.get("role") == "assistant" else 0
    if msg.get("role") != "tool" or n < 2:
        return [msg]
    try:
        results = json.loads(msg["content"])
    except ValueError:
        return [msg]
    if not isinstance(results, list) or len(results) != n or not all(isinstance(r, dict) and "content" in r
                                                                      for r in results):
        return [msg]
    return [{**msg, "content": r["content"] if isinstance(r["content"], str) else json.dumps(r["content"])}
            for r in results]
