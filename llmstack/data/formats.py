"""Format adapters: one raw record -> one row of a canonical schema, or `BadRow(reason)`.

Canonical schemas (what training and eval consume, see llmstack/data/curate.py):
    messages    {"messages": [{"role", "content"}, ...]}         ends with an assistant turn
                with tools, in OpenAI's shape: {"messages": [...], "tools": [{"type": "function", "function":
                {"name", "description", "parameters": JSON Schema}}]}, assistant turns may carry
                "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": dict}}] and results come
                back as {"role": "tool", "content", "tool_call_id"} turns (llmstack/tools.py renders and checks them)
    preference  {"prompt": [messages], "chosen": [one assistant message], "rejected": [one assistant message]}
                (TRL's conversational preference format)
    text        {"text": str}

Inputs: alpaca (instruction/input/output[/system/history]), sharegpt (conversations/from/value; with LLaMA-Factory's
`function_call`/`observation` turns and a `tools` field, as glaive's function-calling set has them), OpenAI messages
(with `tool_calls`, `tool` turns and `tools`; LLaMA-Factory's content parts `text`/`reasoning`/`tool_call` too),
LLaMA-Factory preference (conversations + chosen/rejected turns), plain preference (prompt/chosen/rejected as
strings or messages), KTO (messages + label; only desirable rows become SFT rows), and text.

Assistant messages that think carry `reasoning_content` beside `content`, whichever way the source wrote it (inline
`<think>` blocks, reasoning parts, the field itself): thinking.py normalises every row to that shape.
"""

from __future__ import annotations

import re
from typing import Any

from llmstack.data import thinking
from llmstack.data.errors import (  # noqa: F401 (re-exported)
    BAD_ARGUMENTS,
    BAD_JSON,
    BAD_TOOLS,
    UNKNOWN_FUNCTION,
    BadRow,
)

ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
            "bot": "assistant", "system": "system"}
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
    adapter = ADAPTERS[fmt]
    row = thinking.normalise(adapter(rec, text_field) if fmt == "text" else adapter(rec))
    produced = {"messages": "messages", "preference": "preference", "text": "text"}[_schema_of(row)]
    if produced != schema:
        raise BadRow(f"malformed: a {fmt} record makes a {produced} row, but this dataset's schema is {schema}")
    return fill_placeholders(row, placeholders)


def has_tools(row: dict) -> bool:
    """A tool conversation (the `messages` schema with a `tools` list): stored and rendered differently."""
    return "tools" in row


def _schema_of(row: dict) -> str:
    if "chosen" in row:
        return "preference"
    return "messages" if "messages" in row else "text"


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRow(f"malformed: {what} must be a string, got {type(value).__name__}")
    return value


def _turn(turn: Any, role_key: str, content_key: str, where: str) -> dict:
    if not isinstance(turn, dict):
        raise BadRow(f"malformed: {where} must be an object, got {type(turn).__name__}")
    if role_key not in turn or content_key not in turn:
        raise BadRow(f"malformed: {where} needs `{role_key}` and `{content_key}`")
    role = ROLE_MAP.get(str(turn[role_key]).lower())
    if role is None:
        raise BadRow(f"malformed: {where} has unsupported role '{turn[role_key]}'")
    msg = {"role": role, "content": _text(turn[content_key], f"{where}.{content_key}")}
    if thinking.FIELD in turn:  # checked, with inline <think> blocks, by thinking.normalise
        msg[thinking.FIELD] = turn[thinking.FIELD]
    return msg


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
        return _sharegpt_tools(rec, turns)
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
        return _openai_tools(rec, turns)
    messages = [_turn(t, "role", "content", f"messages[{i}]") for i, t in enumerate(turns)]
    return {"messages": _ends_with_assistant(_check_chat(messages, "messages"))}


# ---------------------------------------------------------------- tool calls
SHAREGPT_TOOL_ROLES = {"function_call", "observation"}


def _tools_list(value: Any) -> list[dict]:
    """A row's tools as OpenAI tool specs. Sources write them as a JSON string (LLaMA-Factory, glaive) or a list, of
    OpenAI specs or bare function specs; each must name a function (OpenAI's name rule) and give a valid JSON Schema."""
    import json

    from jsonschema import Draft202012Validator, SchemaError

    from llmstack.tools import NAME_PATTERN, function_of

    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise BadRow(f"{BAD_TOOLS}: `tools` is not valid JSON ({exc})") from None
    if not isinstance(value, list):
        raise BadRow(f"{BAD_TOOLS}: `tools` must be a list, got {type(value).__name__}")
    out, names = [], set()
    for i, tool in enumerate(value):
        fn = function_of(tool)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME_PATTERN.match(fn["name"]):
            raise BadRow(f"{BAD_TOOLS}: tools[{i}] has no valid function name")
        if fn["name"] in names:
            raise BadRow(f"{BAD_TOOLS}: function '{fn['name']}' is declared twice")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        try:
            Draft202012Validator.check_schema(params)
        except SchemaError as exc:
            raise BadRow(f"{BAD_TOOLS}: parameters of '{fn['name']}' are not a valid JSON Schema "
                         f"({exc.message[:120]})") from None
        names.add(fn["name"])
        spec = {"name": fn["name"], "description": fn.get("description") or "", "parameters": params}
        out.append({"type": "function", "function": spec})
    return out


def _call(name: Any, arguments: Any, tools: list[dict], where: str) -> dict:
    """One call, checked against the row's tools (llmstack.tools.check_call, jsonschema), arguments as a dict."""
    import json

    from llmstack.tools import ToolCallError, check_call

    if not isinstance(name, str):
        raise BadRow(f"malformed: {where} has no function name")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise BadRow(f"{BAD_JSON}: {where} ({exc.msg})") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise BadRow(f"{BAD_JSON}: {where} arguments must be a JSON object, got {type(arguments).__name__}")
    call = {"name": name, "arguments": arguments}
    try:
        check_call(call, tools)
    except ToolCallError as exc:
        reason = UNKNOWN_FUNCTION if "not one of its tools" in str(exc) else BAD_ARGUMENTS
        raise BadRow(f"{reason}: {where} {exc}") from None
    return call


def _tool_row(messages: list[dict], tools: list[dict], where: str) -> dict:
    """Check the turn order of a tool conversation: calls only in assistant turns, every tool turn answers a call
    made before it (ids assigned in order, `call_<k>`, deterministic so identical rows stay identical for dedup), and
    the conversation starts with a user turn and ends with an assistant turn."""
    if not messages:
        raise BadRow(f"malformed: {where} has no turns")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    if not body or body[0]["role"] != "user":
        raise BadRow(f"malformed: {where} must start with a user turn (after an optional system turn)")
    pending: list[str] = []  # ids of calls not answered yet
    for a, b in zip([None] + body, body):
        role = b["role"]
        if role == "system":
            raise BadRow(f"malformed: {where} has a system turn after the start")
        if role == "tool":
            if not pending:
                raise BadRow(f"malformed: {where} has a tool result that answers no call")
            b.setdefault("tool_call_id", pending[0])
            if b["tool_call_id"] not in pending:
                raise BadRow(f"malformed: {where} has a tool result for call '{b['tool_call_id']}', which was not "
                             f"made (or was answered already)")
            pending.remove(b["tool_call_id"])
            continue
        if pending:
            raise BadRow(f"malformed: {where} has a call without a tool result before the next {role} turn")
        if a is not None and role == a["role"]:
            raise BadRow(f"malformed: {where} has two {role} turns in a row")
        pending = [c["id"] for c in b.get("tool_calls") or []]
    if body[-1]["role"] != "assistant":
        raise BadRow("malformed: the conversation must end with an assistant turn")
    return {"messages": messages, "tools": tools}


def _calls_turn(calls: list[tuple[Any, Any]], tools: list[dict], first_id: int, where: str, content: str = "") -> dict:
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": f"call_{first_id + k}", "type": "function", "function": _call(name, args, tools, f"{where}")}
        for k, (name, args) in enumerate(calls)]}


def _sharegpt_tools(rec: dict, turns: list) -> dict:
    """LLaMA-Factory's sharegpt tool form: `function_call` turns hold {"name", "arguments"} as JSON text (or a list
    of them: parallel calls), `observation` turns the tool's result, `tools` the specs (a JSON string in glaive)."""
    import json

    tools = _tools_list(rec.get("tools"))
    messages: list[dict] = []
    if rec.get("system"):
        messages.append({"role": "system", "content": _text(rec["system"], "system")})
    n_calls = 0
    for i, t in enumerate(turns):
        where = f"conversations[{i}]"
        if isinstance(t, dict) and t.get("from") == "function_call":
            try:
                value = json.loads(_text(t.get("value"), f"{where}.value"))
            except ValueError as exc:
                raise BadRow(f"{BAD_JSON}: {where} is not a JSON call ({exc})") from None
            items = value if isinstance(value, list) else [value]
            if not items or not all(isinstance(c, dict) for c in items):
                raise BadRow(f"malformed: {where} must hold a call object or a list of them")
            turn = _calls_turn([(c.get("name"), c.get("arguments")) for c in items], tools, n_calls, where)
            n_calls += len(items)
            messages.append(turn)
        elif isinstance(t, dict) and t.get("from") == "observation":
            messages.append({"role": "tool", "content": _text(t.get("value"), f"{where}.value")})
        else:
            messages.append(_turn(t, "from", "value", where))
    return _tool_row(messages, tools, "conversations")


def _openai_tools(rec: dict, turns: list) -> dict:
    """OpenAI-shaped rows: assistant `tool_calls` (arguments as JSON text, as the API sends them, or as objects),
    `tool` turns with `tool_call_id`, `tools` specs."""
    tools = _tools_list(rec.get("tools"))
    messages: list[dict] = []
    n_calls = 0
    for i, t in enumerate(turns):
        where = f"messages[{i}]"
        if isinstance(t, dict) and t.get("role") == "tool":
            msg = {"role": "tool", "content": _text(t.get("content"), f"{where}.content")}
            if t.get("tool_call_id") is not None:
                msg["tool_call_id"] = _text(t["tool_call_id"], f"{where}.tool_call_id")
            if thinking.FIELD in t:  # refused by thinking.normalise: a tool turn does not think
                msg[thinking.FIELD] = t[thinking.FIELD]
            messages.append(msg)
        elif isinstance(t, dict) and t.get("role") == "assistant" and t.get("tool_calls"):
            calls = t["tool_calls"]
            if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
                raise BadRow(f"malformed: {where}.tool_calls must be a list of objects")
            fns = [c.get("function", c) for c in calls]
            if not all(isinstance(f, dict) for f in fns):
                raise BadRow(f"malformed: {where}.tool_calls[].function must be an object")
            turn = _calls_turn([(f.get("name"), f.get("arguments")) for f in fns], tools, n_calls, where,
                               _text(t.get("content") or "", f"{where}.content"))
            for c, new in zip(calls, turn["tool_calls"]):  # keep the source's ids: tool turns refer to them
                if isinstance(c.get("id"), str) and c["id"]:
                    new["id"] = c["id"]
            n_calls += len(calls)
            if thinking.FIELD in t:
                turn[thinking.FIELD] = t[thinking.FIELD]
            messages.append(turn)
        else:
            messages.append(_turn(t, "role", "content", where))
    return _tool_row(messages, tools, "messages")


def kto(rec: dict) -> dict:
    _need(rec, "messages", "label")
    if rec["label"] is not True:
        # An undesirable KTO example is not an SFT target: it is quarantined, not silently dropped.
        raise BadRow("kto: label is not true (undesirable example, not used as an SFT target)")
    return openai_messages(rec)


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


ADAPTERS = {"alpaca": alpaca, "sharegpt": sharegpt, "messages": openai_messages, "kto": kto,
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
