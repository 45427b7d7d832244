"""Tool-call conversations, the `messages` schema with a `tools` list: LLaMA-Factory's sharegpt form
(`function_call` / `observation` turns) and OpenAI's (`tool_calls`, `tool` turns), each call checked against the row's
own tool specs (llmstack/tools.py). formats.py sends a record here when it has tools or tool turns.
"""

from __future__ import annotations

from typing import Any

from llmstack.data.turns import BAD_ARGUMENTS, BAD_JSON, BAD_TOOLS, REASONING, UNKNOWN_FUNCTION, BadRow
from llmstack.data.turns import text as _text
from llmstack.data.turns import turn as _turn

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


def sharegpt_tools(rec: dict, turns: list) -> dict:
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


def openai_tools(rec: dict, turns: list) -> dict:
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
            if REASONING in t:  # refused by thinking.normalise: a tool turn does not think
                msg[REASONING] = t[REASONING]
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
            if REASONING in t:
                turn[REASONING] = t[REASONING]
            messages.append(turn)
        else:
            messages.append(_turn(t, "role", "content", where))
    return _tool_row(messages, tools, "messages")
