"""Tool calling, in one place for curation, training, serving and evaluation: the chat template that renders tools
and calls, the parser that reads calls back out of generated text, the JSON Schema that constrains a forced call, and
the checks a call must pass against the tools a conversation declared.

The format is Hermes', as Qwen2.5 writes it: tool specs in the system turn inside `<tools></tools>`, each call as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in the assistant turn, tool results in
`<tool_response>` blocks. We do not write our own: the template is TRL's maintained Qwen2.5 *training* template (it
has `{% generation %}` markers, so SFT trains on assistant text and calls only), with only its default system line
swapped for the model's own; the parser is transformers' `parse_response` with TRL's response template for that
family, and vLLM's `hermes` tool parser reads the same text (llmstack/serve/engines/vllm.py). Plain chats (no tools)
render exactly as SmolLM2's own ChatML template does (tested), so writing this template into a model changes nothing
for callers who never send tools.

Arguments inside conversations are JSON objects (dicts), as transformers' chat templates expect; on the wire OpenAI
sends them as JSON text, and the API converts at the edge (`arguments_object`).

Nothing here imports torch or transformers at module load.
"""

from __future__ import annotations

import importlib.util
import json
import re
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

_QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
DEFAULT_SYSTEM = "You are a helpful assistant."
_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.DOTALL)
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")  # OpenAI's rule for function names


class ToolCallError(ValueError):
    """A call that does not fit the declared tools: unknown function, arguments that are not a JSON object, or
    arguments the function's JSON Schema rejects. The message says which."""


# ------------------------------------------------------------------------------------------------ the template
@lru_cache(maxsize=1)
def _trl_file(name: str) -> str:
    # Located without importing trl (its import pulls torch and takes seconds): the file ships in trl's wheel.
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("trl is not installed; the tool-calling chat template ships with it")
    return (Path(next(iter(spec.submodule_search_locations))) / "chat_templates" / name).read_text()


def tool_template(default_system: str | None = None) -> str:
    """The tool-aware ChatML template (TRL's Qwen2.5 training template) with `default_system` as the system line a
    conversation without a system message gets."""
    template = _trl_file("qwen2_5_training.jinja")
    if _QWEN_DEFAULT_SYSTEM not in template:  # a future trl changed the template: fail loudly, never half-swap
        raise RuntimeError("trl's qwen2_5_training.jinja no longer holds the default system line llmstack replaces")
    system = default_system if default_system is not None else DEFAULT_SYSTEM
    # the line sits inside single-quoted Jinja string literals
    return template.replace(_QWEN_DEFAULT_SYSTEM, system.replace("\\", "\\\\").replace("'", "\\'")
                            .replace("\n", "\\n"))


def default_system_of(chat_template: str | None) -> str | None:
    """The system line a ChatML template writes when a conversation has none (SmolLM2: "You are a helpful AI
    assistant named SmolLM, trained by Hugging Face"), read from the template's source; None if it writes none."""
    if not chat_template:
        return None
    m = _CHATML_SYSTEM.search(chat_template)
    return m.group(1) if m else None


def template_for(tokenizer) -> str:
    """The template to render a tool conversation with: the tokenizer's own when it can render one, else the tool
    template carrying the model's own default system line."""
    if supports_tools(tokenizer.chat_template):
        return tokenizer.chat_template
    return tool_template(default_system_of(tokenizer.chat_template))


def supports_tools(chat_template: str | None) -> bool:
    """Whether a chat template renders tool specs and assistant tool calls (it reads both `tools` and
    `tool_calls`). A cheap textual check; training confirms with TRL's `supports_tool_calling`, which renders."""
    return bool(chat_template) and "tools" in chat_template and "tool_calls" in chat_template


# ----------------------------------------------------------------------------------------------------- parsing
def response_template() -> dict:
    """TRL's response template for the Qwen/Hermes family (transformers' `parse_response` reads it)."""
    from trl.chat_template_utils import qwen3_template

    return qwen3_template


def parse_calls(text: str, tools: list[dict] | None = None) -> tuple[str | None, list[dict]]:
    """Content and calls of an assistant answer in the Hermes format, with transformers' `parse_response`. Calls
    come back as {"name", "arguments"} with arguments a dict; text that does not parse (a broken call, a stray
    `<tool_call>`) is all content and no call, as vLLM's hermes parser treats it."""
    if "<tool_call>" not in text:
        return text, []
    from transformers.utils.chat_parsing.response_parser import parse_response

    try:
        msg = parse_response(text, _cached_template(), prefix="")
    except ValueError:
        return text, []
    calls = []
    for c in msg.get("tool_calls") or []:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"),
                                                                                               dict):
            return text, []
        calls.append({"name": fn["name"], "arguments": fn["arguments"]})
    content = msg.get("content")
    return (content if content else None), calls


@lru_cache(maxsize=1)
def _cached_template():
    from transformers.utils.chat_parsing.response_parser import load_response_template

    return load_response_template(response_template())


def parse_forced(text: str, many: bool) -> list[dict] | None:
    """The calls of a constrained answer (`call_schema`): one {"name", "arguments"} object, or a list of them when
    `many`. None when the text is not that (generation stopped at max_tokens mid-object)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if many else [value]
    if not isinstance(items, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str)
                                              and isinstance(c.get("arguments"), dict) for c in items):
        return None
    return [{"name": c["name"], "arguments": c["arguments"]} for c in items]


class CallSplitter:
    """Streamed text split into content that may go out now and complete `<tool_call>...</tool_call>` blocks.

    Content stops at the first `<tool_call>`; a tail that may be the start of that tag is held back until the next
    text decides it. A call goes out when its closing tag arrives (so a client never sees a call that does not
    parse); a block that does not parse goes out as content, as the non-streamed answer would have it."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self):
        self.buf = ""
        self.in_call = False
        self.calls_seen = 0

    def feed(self, text: str, final: bool = False) -> list[tuple[str, Any]]:
        """Events: ("content", str) and ("call", {"name", "arguments"})."""
        self.buf += text
        out: list[tuple[str, Any]] = []
        while True:
            if not self.in_call:
                at = self.buf.find(self.OPEN)
                if at < 0:
                    keep = 0 if final else _partial_overlap(self.buf, self.OPEN)
                    ready = self.buf[:len(self.buf) - keep]
                    if ready and (self.calls_seen == 0 or ready.strip()):
                        out.append(("content", ready))
                    self.buf = self.buf[len(ready):]
                    return out
                if self.buf[:at].strip() or (at and self.calls_seen == 0):
                    out.append(("content", self.buf[:at]))
                self.buf, self.in_call = self.buf[at:], True
            end = self.buf.find(self.CLOSE)
            if end < 0:
                if final:
                    out.append(("content", self.buf))
                    self.buf = ""
                return out
            block, self.buf = self.buf[:end + len(self.CLOSE)], self.buf[end + len(self.CLOSE):]
            self.in_call = False
            _, calls = parse_calls(block)
            if calls:
                self.calls_seen += len(calls)
                out += [("call", c) for c in calls]
            else:
                out.append(("content", block))


def _partial_overlap(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    return max((k for k in range(1, len(tag)) if text.endswith(tag[:k])), default=0)


# -------------------------------------------------------------------------------------- schemas and checks
def function_of(tool: dict) -> dict:
    """The function spec of a tool in OpenAI's shape ({"type": "function", "function": {...}}) or bare."""
    return tool.get("function", tool) if isinstance(tool, dict) else {}


def call_schema(tools: list[dict], name: str | None = None, many: bool = False) -> dict:
    """The JSON Schema a forced call is decoded under (tool_choice `required` or a named function): an object with
    the function's name as a constant and its parameters schema as `arguments`; for `required`, any of the tools,
    and an array of at least one such object when parallel calls are allowed.

    A parameters schema with `$defs` / `definitions` or local `$ref`s (what pydantic emits for nested models) is
    lifted, with its definitions, to the combined schema's root `$defs` under one key per tool (`tool0`, ...), so two
    tools' same-named models never collide, and each of its `$ref`s is rewritten to where its target now lives; left
    nested, `#/$defs/...` would resolve against the combined root and fail to compile ("Cannot find field $defs")."""
    fns = [fn for fn in map(function_of, tools) if name is None or fn.get("name") == name]
    options, lifted = [], {}
    for k, fn in enumerate(fns):
        params = fn.get("parameters") or {"type": "object"}
        if _has_local_ref(params) or any(isinstance(params.get(w), dict) for w in ("$defs", "definitions")):
            key = f"#/$defs/tool{k}"
            home = {w: params[w] for w in ("$defs", "definitions") if isinstance(params.get(w), dict)}
            home["params"] = {w: v for w, v in params.items() if w not in home}
            lifted[f"tool{k}"] = _rebase_refs(home, key)
            params = {"$ref": f"{key}/params"}
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    one = options[0] if len(options) == 1 else {"anyOf": options}
    out = {"type": "array", "items": one, "minItems": 1} if many else one
    return {"$defs": lifted, **out} if lifted else out


_DATA_KEYS = ("enum", "const", "default", "examples")  # values, not schemas: a {"$ref": ...} in them is data


def _has_local_ref(node: Any) -> bool:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
            return True
        return any(_has_local_ref(v) for k, v in node.items() if k not in _DATA_KEYS)
    return isinstance(node, list) and any(_has_local_ref(v) for v in node)


def _rebase_refs(node: Any, key: str) -> Any:
    """A copy of a tool's lifted parameters (`params`) and definitions with each local `$ref` pointing to where its
    target now sits under `key`: `#/$defs/X` and `#/definitions/X` to the lifted definitions, any other `#...`
    (the parameters' own root) into `params`. Pointers, not array positions: xgrammar resolves no `anyOf/1`."""
    if isinstance(node, list):
        return [_rebase_refs(v, key) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "$ref" and isinstance(v, str) and v.startswith("#"):
            v = key + v[1:] if v.startswith(("#/$defs/", "#/definitions/")) else f"{key}/params{v[1:]}"
        elif k not in _DATA_KEYS:
            v = _rebase_refs(v, key)
        out[k] = v
    return out


def check_call(call: dict, tools: list[dict]) -> None:
    """Raise ToolCallError unless the call names a declared function and its arguments satisfy that function's
    parameters schema (JSON Schema 2020-12, as OpenAI reads it)."""
    from jsonschema import Draft202012Validator

    by_name = {function_of(t).get("name"): function_of(t) for t in tools}
    fn = by_name.get(call.get("name"))
    if fn is None:
        raise ToolCallError(f"calls '{call.get('name')}', which is not one of its tools "
                            f"({', '.join(sorted(n for n in by_name if isinstance(n, str))) or 'none declared'})")
    args = call.get("arguments")
    if not isinstance(args, dict):
        raise ToolCallError(f"arguments of '{fn['name']}' are not a JSON object")
    errors = sorted(Draft202012Validator(fn.get("parameters") or {"type": "object"}).iter_errors(args),
                    key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "arguments"
        raise ToolCallError(f"arguments of '{fn['name']}' do not match its schema at {where}: "
                            f"{errors[0].message[:200]}")


def arguments_object(arguments: Any) -> dict:
    """Call arguments as a dict: OpenAI sends them as JSON text; conversations and templates hold objects."""
    if isinstance(arguments, dict):
        return arguments
    if isinstance(arguments, str):
        try:
            value = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise ToolCallError(f"arguments are not valid JSON ({exc})") from None
        if isinstance(value, dict):
            return value
    raise ToolCallError("arguments must be a JSON object")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"
