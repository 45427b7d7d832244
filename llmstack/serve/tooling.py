"""Tool planning for /v1/chat/completions: what a request's `tools` / `tool_choice` ask of the model (checked before
any work), the conversation's earlier calls and results, and the model's answer read back as OpenAI tool calls —
whole (`ToolPlan.read_calls`) or as a stream of deltas (`ToolStream`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from llmstack import tools
from llmstack.serve.protocol import APIError, parse_json_text
from llmstack.serve.schemas import check_schema


@dataclass
class ToolPlan:
    """What a chat request asks of tool calling. `mode`: auto (the model may call), required (it must call one or
    more), named (it must call `name`), none (tools are not offered to the model). A forced call (required / named)
    is decoded under the call's JSON Schema, so its arguments always parse and match the declared parameters."""

    tools: list[dict]
    mode: str
    name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    @property
    def many(self) -> bool:  # a forced answer is a JSON array of calls (required + parallel) or one call object
        return self.mode == "required" and self.parallel

    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    def schema(self) -> dict:
        return tools.call_schema(self.tools, self.name, many=self.many)

    def read_calls(self, text: str, engine, audit: dict) -> tuple[str | None, list[dict]]:
        """Content and calls (OpenAI's wire shape) of one finished answer. A forced call is the constrained JSON
        itself; otherwise the engine's parser reads Hermes blocks (vLLM's own parser on the vllm engine). An answer
        whose calls do not parse, or name a function that was not offered, stays text: a client is never handed a
        call it did not declare."""
        if self.forced:
            calls = tools.parse_forced(text, self.many)
            content = None
        else:
            parse = getattr(engine, "parse_tool_calls", None) or tools.parse_calls
            content, calls = parse(text)
        if not calls or any(c["name"] not in self.names() for c in calls):
            return text, []
        if not self.parallel:
            calls = calls[:1]
        audit.setdefault("tool_calls", []).extend(c["name"] for c in calls)  # names only, never arguments
        return content, [wire_call(c) for c in calls]


def plan_tools(req, caps) -> ToolPlan | None:
    """The request's tools, checked before any work: the legacy `functions` fields get a pointer to `tools`; too
    many tools, duplicate names, a parameters schema that is not a JSON Schema (or too large to compile quickly), a
    `tool_choice` naming no offered tool, or one that asks for a call with no tools offered: 400 each."""
    if req.functions is not None or req.function_call is not None:
        raise APIError(400, "`functions`/`function_call` are OpenAI's deprecated form: send `tools` and "
                       "`tool_choice` instead", param="functions" if req.functions is not None else "function_call",
                       code="unsupported_parameter")
    choice = req.tool_choice
    if not req.tools:
        if choice is None or choice in ("none", "auto"):
            return None
        raise APIError(400, "`tool_choice` asks for a tool call, but the request offers no `tools`",
                       param="tool_choice")
    if len(req.tools) > caps.max_tools:
        raise APIError(400, f"{len(req.tools)} tools offered; this server allows at most {caps.max_tools}",
                       param="tools", code="too_many_tools")
    seen: set[str] = set()
    specs = []
    for i, t in enumerate(req.tools):
        if t.function.name in seen:
            raise APIError(400, f"two tools are named '{t.function.name}'; names must be unique",
                           param=f"tools[{i}].function.name")
        seen.add(t.function.name)
        if t.function.parameters is not None:
            check_json_schema(t.function.parameters, f"tools[{i}].function.parameters", caps.max_tool_schema_bytes)
        specs.append(t.model_dump(exclude_none=True))
    if isinstance(choice, str) or choice is None:
        mode, name = choice or "auto", None
    else:
        mode, name = "named", choice.function.name
        if name not in seen:
            raise APIError(400, f"tool_choice names '{name[:64]}', which is not one of the offered tools "
                           f"({', '.join(sorted(seen))})", param="tool_choice")
    if mode in ("required", "named") and req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, "a forced tool call is decoded as the call's JSON; it cannot also follow "
                       "`response_format`: send one of the two", param="response_format")
    plan = ToolPlan(tools=specs, mode=mode, name=name, parallel=req.parallel_tool_calls)
    if plan.forced:  # the combined call schema (lifted `$defs`) is what the engine compiles: checked as it will be
        check_schema(plan.schema(), "the forced call's schema (from `tools`)", "tools")
    return plan


def check_history(req, max_depth: int) -> None:
    """Calls and results in the conversation are OpenAI's shape: calls only on assistant turns, with arguments that
    are a JSON object; every tool turn answers a call made before it (`tool_call_id`). Arguments sent as JSON text are
    parsed here under the body's own limits (depth, lone surrogates: `parse_json_text`) and kept parsed, so nothing
    later parses them again without those limits."""
    ids: set[str] = set()
    for i, m in enumerate(req.messages):
        if m.function_call is not None:
            raise APIError(400, "`function_call` in a message is OpenAI's deprecated form: send `tool_calls`",
                           param=f"messages[{i}].function_call", code="unsupported_parameter")
        for j, call in enumerate(m.tool_calls or []):
            if m.role != "assistant":
                raise APIError(400, "only assistant messages carry `tool_calls`", param=f"messages[{i}].tool_calls")
            param = f"messages[{i}].tool_calls[{j}].function.arguments"
            args = call.function.arguments
            if isinstance(args, str):
                args = parse_json_text(args, max_depth, param) if args.strip() else {}
            if not isinstance(args, dict):
                raise APIError(400, "tool call arguments: arguments must be a JSON object", param=param)
            call.function.arguments = args
            if call.id:
                ids.add(call.id)
        if m.role == "tool":
            if not m.tool_call_id:
                raise APIError(400, "a tool message needs `tool_call_id`: the id of the call it answers",
                               param=f"messages[{i}].tool_call_id")
            if m.tool_call_id not in ids:
                raise APIError(400, f"messages[{i}] answers tool call '{m.tool_call_id[:64]}', which no earlier "
                               "assistant message made", param=f"messages[{i}].tool_call_id")


def rail_arguments(value, guard, param: str):
    """An earlier call's parsed arguments through the input rails, keys and values alike: a rail that blocks refuses
    the request; a redaction is applied in place and the template serialises the redacted object, so the model reads
    `{"<EMAIL>": "..."}`, never the address. Two keys that become one when redacted are a 400, never a silent drop."""
    if isinstance(value, str):
        return guard(value, param)
    if isinstance(value, list):
        return [rail_arguments(v, guard, param) for v in value]
    if isinstance(value, dict):
        out: dict = {}
        for k, v in value.items():
            key = guard(k, param)
            if key in out:
                raise APIError(400, "two argument keys are the same once the input rails redact them; send keys "
                               "without personal data", param=param, code="redaction_collision")
            out[key] = rail_arguments(v, guard, param)
        return out
    return value


def rail_spec(spec: dict, guard, param: str) -> dict:
    """A tool spec as the model will read it, every string through the input rails. Names and keys are structure:
    a rail that blocks refuses the request, and one that would rewrite them is a 400 (a renamed function or property
    would no longer be the one declared). String values — the description, and the parameters schema's descriptions,
    titles, enum values, examples — reach the prompt redacted. The plan keeps the client's own spec for decoding."""
    fn = spec["function"]
    railed = {**fn, "name": rail_name(fn["name"], guard, f"{param}.name")}
    if isinstance(fn.get("description"), str):
        railed["description"] = guard(fn["description"], f"{param}.description")
    if fn.get("parameters") is not None:
        railed["parameters"] = _rail_schema(fn["parameters"], guard, f"{param}.parameters")
    return {**spec, "function": railed}


def rail_name(text: str, guard, param: str) -> str:
    """A function name or schema key through the input rails: refused if a rail blocks it or would rewrite it."""
    if guard(text, param) != text:
        raise APIError(400, f"{param} holds text the input rails redact; a name or key cannot be rewritten, so "
                       "send it without that text", param=param, code="unredactable_name")
    return text


def _rail_schema(value, guard, path: str):
    if isinstance(value, str):
        return guard(value, path)
    if isinstance(value, list):
        return [_rail_schema(v, guard, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {rail_name(k, guard, path): _rail_schema(v, guard, f"{path}.{k[:64]}") for k, v in value.items()}
    return value


def check_json_schema(schema: dict, param: str, limit: int) -> None:
    """A response_format or tool parameters schema is checked here, in the API process, before the engine compiles
    it: a schema that is not a JSON Schema, or one too large to compile quickly, is the client's 400, never an engine
    failure."""
    what = "response_format.json_schema.schema" if param == "response_format" else param
    size = len(json.dumps(schema))
    if size > limit:
        raise APIError(400, f"{what} is {size} bytes of JSON; the limit is {limit}", param=param,
                       code="invalid_json_schema")
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise APIError(400, f"{what} is not a valid JSON Schema: {exc.message[:300]}", param=param,
                       code="invalid_json_schema") from None
    check_schema(schema, what, param)  # recursion, bounds, what xgrammar refuses: the client's 400, never the engine's


def wire_call(call: dict) -> dict:
    return {"id": tools.new_call_id(), "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}

class ToolStream:
    """The n choices' railed text as OpenAI streams tool calls: content deltas as they come (a possible `<tool_call>`
    tag held back), then each call once its block is complete — a delta with its index, id and name, then one with
    its arguments — and finish_reason `tool_calls`. A forced call goes out at the end. Logprobs rows ride on the next
    delta that goes out. `feed` yields the keyword arguments of each chunk to send."""

    def __init__(self, plan: ToolPlan, n: int, audit: dict):
        self.plan, self.audit = plan, audit
        self.splitters = [tools.CallSplitter() for _ in range(n)]
        self.forced_text = [""] * n
        self.calls_out = [0] * n
        self.rows_due: list[list[dict]] = [[] for _ in range(n)]

    def feed(self, i: int, text: str, rows: list[dict], finish: str | None) -> Iterator[dict]:
        plan = self.plan
        self.rows_due[i] += rows
        final = finish is not None
        if plan.forced:
            self.forced_text[i] += text
            events = []
            if final:
                calls = tools.parse_forced(self.forced_text[i], plan.many)
                events = [("call", c) for c in calls] if calls else [("content", self.forced_text[i])]
        else:
            events = self.splitters[i].feed(text, final=final)
        for kind, value in events:
            if kind == "call" and value["name"] not in plan.names():  # never hand out an undeclared call
                kind, value = "content", f"<tool_call>\n{json.dumps(value, ensure_ascii=False)}\n</tool_call>"
            if kind == "call" and self.calls_out[i] and not plan.parallel:
                continue  # parallel_tool_calls false: the first call only
            lp, self.rows_due[i] = self.rows_due[i], []
            if kind == "content":
                yield {"text": value, "lp": lp}
                continue
            wc = wire_call(value)
            self.audit.setdefault("tool_calls", []).append(value["name"])
            yield {"lp": lp, "calls": [{"index": self.calls_out[i], "id": wc["id"], "type": "function",
                                        "function": {"name": value["name"], "arguments": ""}}]}
            yield {"calls": [{"index": self.calls_out[i], "function": {"arguments": wc["function"]["arguments"]}}]}
            self.calls_out[i] += 1
        if final:
            lp, self.rows_due[i] = self.rows_due[i], []
            yield {"finish": "tool_calls" if self.calls_out[i] else finish, "lp": lp}
