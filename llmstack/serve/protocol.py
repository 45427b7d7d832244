"""The wire: OpenAI's request schemas as this server accepts them, its error type and error body, and the shapes of
logprobs, usage and server-sent events in responses. Nothing here knows about engines, keys or rails."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# ------------------------------------------------------------------------------------------- request schemas
# The wire's types are JSON's, as the OpenAPI document states them: `"stream": 0`, `"temperature": false` and
# `"max_tokens": "16"` are the client's 400, not coerced (pydantic's strict mode) — an integer is any whole number
# (`16.0`, as JSON Schema reads it), a number any integer or float.
WIRE = ConfigDict(extra="ignore", strict=True)


def _whole_number(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_whole_number)]
# OpenAI's legacy function-calling fields, as the OpenAPI document marks them: read only to be refused with a 400
LEGACY = {"deprecated": True, "description": "OpenAI's legacy function calling: refused with a 400 that points to "
                                            "`tools` / `tool_calls`"}


class _Loose(BaseModel):
    # OpenAI clients send fields we do not use (user, metadata, ...): accept and ignore them.
    model_config = WIRE


class ContentPart(_Loose):
    type: str
    text: str | None = None


# OpenAI's rule for function names (llmstack.tools.NAME_PATTERN): it also keeps a name from closing the template's
# `{"name": "…"}` and writing a line of its own.
FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class FunctionCall(_Loose):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str | dict = "{}"  # OpenAI sends JSON text; a JSON object is accepted too


class ToolCall(_Loose):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(_Loose):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Loose):
    type: Literal["function"]
    function: FunctionSpec


class _ChoiceName(_Loose):
    name: str


class NamedToolChoice(_Loose):
    type: Literal["function"]
    function: _ChoiceName


class ChatMessage(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None
    function_call: dict | None = Field(None, json_schema_extra=LEGACY)  # refused with a pointer to `tool_calls`
    # An earlier assistant turn's thinking, as vLLM / DeepSeek clients send it back (`reasoning` is vLLM's newer
    # name): through the input rails like any text; on any other role a 400 (llmstack.serve.reasoning).
    reasoning_content: str | None = None
    reasoning: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise APIError(400, "only text content parts are supported", param="messages")
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class JsonSchemaFormat(_Loose):
    name: str = "response"
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Loose):
    include_usage: bool = False


class _Sampling(_Loose):
    model: str
    user: str | None = None  # the end user's id: keeps one user on one side of a canary split
    max_tokens: Integer | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Integer = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: Integer | None = Field(None, ge=INT64_MIN, le=INT64_MAX)  # as vLLM's OpenAI layer: the engine takes int64
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatTemplateKwargs(BaseModel):
    """vLLM's `chat_template_kwargs`, limited to the variables this server lets a client set: a client never passes
    arbitrary variables into the chat template (an unknown key is a 400)."""

    model_config = ConfigDict(extra="forbid")
    enable_thinking: StrictBool | None = None  # false: the template renders an empty thinking block


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Integer | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Integer | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: ChatTemplateKwargs | None = None
    # The thinking budget of a reasoning model (tokens); 0: no thinking. vLLM calls its own `thinking_token_budget`.
    max_reasoning_tokens: Integer | None = Field(None, ge=0, le=INT64_MAX)
    # The legacy function-calling fields: refused with a 400 that points to `tools` (never silently ignored)
    functions: list | None = Field(None, json_schema_extra=LEGACY)
    function_call: str | dict | None = Field(None, json_schema_extra=LEGACY)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[Integer] | list[list[Integer]]
    # OpenAI's default for /v1/completions; 0 only with `echo` (score the prompt, generate nothing)
    max_tokens: Integer | None = Field(16, ge=0)
    logprobs: Integer | None = Field(None, ge=0)
    echo: bool = False  # the prompt comes back before the completion, with its tokens' logprobs if `logprobs` is set


class AdapterLoad(_Loose):
    path: str = Field(min_length=1, max_length=4096)  # a LoRA adapter folder on the server's filesystem


# ------------------------------------------------------------------------------------------------------ errors
class APIError(Exception):
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p not in ("body",))
    return f"{loc}: {err['msg']}" if loc else err["msg"], loc or None


def chat_logprobs(rows: list[dict]) -> dict:
    def item(r):
        return {"token": r["token"], "logprob": r["logprob"], "bytes": list(r["token"].encode())}

    return {"content": [{**item(r), "top_logprobs": [item(t) for t in r["top"]]} for r in rows]}


def completion_logprobs(rows: list[dict | None], first_token: str = "") -> dict:
    """OpenAI's legacy shape. A None row is the first echoed prompt token, which nothing predicts: its logprob and
    top_logprobs are null (as OpenAI and vLLM return them), its text is `first_token`."""
    offsets, pos, texts = [], 0, []
    for r in rows:
        texts.append(r["token"] if r is not None else first_token)
        offsets.append(pos)
        pos += len(texts[-1])
    return {"tokens": texts, "token_logprobs": [r["logprob"] if r else None for r in rows],
            "top_logprobs": [{t["token"]: t["logprob"] for t in r["top"]} if r else None for r in rows],
            "text_offset": offsets}


def usage(prompt: int, completion: int, reasoning: int | None = None) -> dict:
    """OpenAI's usage; a reasoning model's answer also counts its thinking (part of `completion`) apart, as
    `completion_tokens_details.reasoning_tokens`."""
    out = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


# json.dumps with any argument but the defaults builds a new encoder on every call; a stream encodes once per token.
_ENCODER = json.JSONEncoder(ensure_ascii=False)


def to_json(obj) -> str:
    """`json.dumps(obj, ensure_ascii=False)`, with one encoder for the process."""
    return _ENCODER.encode(obj)


def sse(obj: dict, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {to_json(obj)}\n\n"


# ------------------------------------------------------------------------------------------------ the body
def parse_body(body: bytes, max_depth: int) -> dict:
    """A request body as a JSON object, or an APIError 400 that says what is wrong with it: not UTF-8, not JSON,
    NaN/Infinity, an integer too long for Python to convert (4,300 digits), nested deeper than `max_depth`, or a lone
    UTF-16 surrogate (`"\\ud800"`: valid JSON, but no text encoding can carry it, so it would fail deep inside the
    tokenizer). Linear in the body; the server runs it in a worker thread, off the event loop."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start}: {exc.reason})",
                       code="invalid_encoding") from None
    raw = parse_json_text(text or "null", max_depth)
    if not isinstance(raw, dict):
        raise APIError(400, "request body must be a JSON object")
    return raw


def parse_json_text(text: str, max_depth: int, param: str | None = None):
    """JSON text under the body's own limits (depth, NaN/Infinity, integer length, lone surrogates): the body itself
    (`param` None), or JSON text a body carries in a string field — an earlier tool call's `arguments` — named by
    `param` in the 400. Size needs no check of its own: the text sits inside a body already held to its byte cap."""
    what = param or "request body"
    try:
        raw = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, f"{what} is nested too deeply (the limit is {max_depth} levels)", param=param,
                       code="too_deeply_nested") from None
    except ValueError as exc:  # JSONDecodeError, or int() refusing a number of more than 4,300 digits
        raise APIError(400, f"{what} is not valid JSON: {str(exc)[:200]}", param=param) from None
    _check_tree(raw, max_depth, param or "")
    return raw


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_tree(raw, max_depth: int, root: str = "") -> None:
    what = f"{root} is" if root else "request body is"
    stack: list[tuple[object, int, str]] = [(raw, 1, root)]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                where = path.lstrip(".") or "the top"
                raise APIError(400, f"{what} nested too deeply at {where} (the limit is {max_depth} levels)",
                               param=root or None, code="too_deeply_nested")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                if isinstance(k, str):
                    _check_text(k, path)
                stack.append((v, depth + 1, f"{path}.{k}" if isinstance(k, str) else f"{path}[{k}]"))
        elif isinstance(node, str):
            _check_text(node, path)


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{path.lstrip('.') or 'body'}: a lone UTF-16 surrogate "
                       f"(\\u{ord(text[exc.start]):04x}) is not text", param=path.lstrip(".") or None,
                       code="invalid_encoding") from None
