"""The wire of Anthropic's Messages API (POST /v1/messages) as this server accepts it, the field-by-field translation
of a request into the internal chat request (protocol.ChatRequest) that the shared request path serves, and the
error body in Anthropic's shape. Shapes follow what the official `anthropic` client sends and parses
(anthropic/types/message_create_params.py, message.py, raw_message_stream_event.py).

Content blocks are read with one loose model and checked by type here, rather than as a pydantic tagged union, so an
unknown block type is a 400 that names the block (`messages[1].content[0].type`) and says what is supported."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, StrictBool, ValidationError

from llmstack.serve.protocol import FUNCTION_NAME, WIRE, APIError, ChatRequest, Integer, validation_message

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error", 529: "overloaded_error"}
# The internal answer's finish_reason as Anthropic's stop_reason (an output rail's withheld answer is a refusal).
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}


# The chat request's field names that the shared path's messages use, as the Messages request names them.
FIELD_NAMES = [(re.compile(r"tools\[(\d+)\]\.function\.parameters"), r"tools[\1].input_schema"),
               (re.compile(r"tools\[(\d+)\]\.function\.name"), r"tools[\1].name"),
               (re.compile(r"response_format\.json_schema\.schema"), "output_config.format.schema"),
               (re.compile(r"\bmax_reasoning_tokens\b"), "thinking.budget_tokens")]


def error_body(err: APIError) -> dict:
    """An error in Anthropic's shape: {"type": "error", "error": {"type", "message"}}, fields named as this API
    names them."""
    message = err.message
    for pattern, name in FIELD_NAMES:
        message = pattern.sub(name, message)
    return {"type": "error", "error": {"type": ERROR_TYPES.get(err.status, "invalid_request_error"),
                                       "message": message}}


class _Loose(BaseModel):
    # Fields this server does not use (cache_control, citations, service_tier, ...) are accepted and ignored.
    model_config = WIRE


class TextBlock(_Loose):
    type: Literal["text"]
    text: str


class Block(_Loose):
    """One content block of a message: text, tool_use, tool_result or thinking (checked in `to_chat`)."""

    type: str
    text: str | None = None  # text
    id: str | None = Field(None, max_length=256)  # tool_use
    name: str | None = Field(None, pattern=FUNCTION_NAME)  # tool_use
    input: dict | None = None  # tool_use
    tool_use_id: str | None = Field(None, max_length=256)  # tool_result
    content: str | list[Block] | None = None  # tool_result: text, or text blocks
    is_error: StrictBool = False  # tool_result
    thinking: str | None = None  # thinking (an earlier turn's, sent back)


class Message(_Loose):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolSpec(_Loose):
    type: Literal["custom"] | None = None  # Anthropic's server tools (bash, web_search, ...) are not served here
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    input_schema: dict


class ToolChoice(_Loose):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: StrictBool = False


class ThinkingConfig(_Loose):
    # adaptive: the model's own default (a reasoning model thinks without a budget); between_tools is not served
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Integer | None = Field(None, ge=1)
    display: Literal["summarized", "omitted"] | None = None  # omitted: no thinking block comes back


class OutputFormat(_Loose):
    type: Literal["json_schema"]
    schema_: dict = Field(alias="schema")


class OutputConfig(_Loose):
    effort: str | None = None  # a hint for Anthropic's models; accepted and not used
    format: OutputFormat | None = None  # structured output: served as the chat endpoint's json_schema


class Metadata(_Loose):
    user_id: str | None = Field(None, max_length=256)


class MessagesRequest(_Loose):
    model: str
    max_tokens: Integer = Field(ge=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: ToolChoice | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Integer | None = None
    metadata: Metadata | None = None
    stream: StrictBool = False
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None


class MessagesChat(ChatRequest):
    """The internal chat request of a Messages call, with what Anthropic's answer needs beyond it."""

    thinking_type: str | None = None  # the request's `thinking.type`
    thinking_omitted: bool = False  # `thinking.display: omitted`: the answer carries no thinking


class MessagesBody:
    """The endpoint's request schema for the shared path (`read_json` calls `model_validate`): an Anthropic body,
    validated, comes out as the internal chat request."""

    @staticmethod
    def model_validate(raw: dict) -> MessagesChat:
        return to_chat(MessagesRequest.model_validate(raw))


def to_chat(req: MessagesRequest) -> MessagesChat:
    """The request as the chat endpoint's: `system` as a system turn, each tool_result block as a tool turn (an error
    result's text prefixed `Error: `), tool_use blocks as the assistant turn's calls, thinking blocks as its
    reasoning_content; tools and tool_choice as OpenAI's; the thinking budget as max_reasoning_tokens; an output_config
    format as response_format. What has no counterpart here is a 400 that says so."""
    if req.top_k is not None:
        raise APIError(400, "top_k is not supported by this server (its engines sample with temperature and top_p "
                       "only); leave it out", param="top_k", code="unsupported_parameter")
    if req.messages[-1].role != "user":
        raise APIError(400, "the last message must be a user message: continuing a prefilled assistant turn is not "
                       "supported by this server", param=f"messages[{len(req.messages) - 1}].role")
    messages: list[dict] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else "".join(b.text for b in req.system)
        messages.append({"role": "system", "content": system})
    calls_made: set[str] = set()
    for i, m in enumerate(req.messages):
        blocks = [Block(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        if not blocks:
            raise APIError(400, f"messages[{i}].content is an empty list: send at least one content block",
                           param=f"messages[{i}].content")
        text, calls, thought = "", [], None
        for j, b in enumerate(blocks):
            where = f"messages[{i}].content[{j}]"
            if b.type == "text" and b.text is not None:
                text += b.text
            elif b.type == "tool_use" and m.role == "assistant" and b.id and b.name and b.input is not None:
                calls.append({"id": b.id, "type": "function", "function": {"name": b.name, "arguments": b.input}})
                calls_made.add(b.id)
            elif b.type == "tool_result" and m.role == "user" and b.tool_use_id:
                if b.tool_use_id not in calls_made:
                    raise APIError(400, f"{where} answers tool_use '{b.tool_use_id[:64]}', which no earlier assistant "
                                   "message made", param=f"{where}.tool_use_id")
                messages.append({"role": "tool", "tool_call_id": b.tool_use_id,
                                 "content": ("Error: " if b.is_error else "") + _result_text(b, where)})
            elif b.type == "thinking" and m.role == "assistant" and b.thinking is not None:
                thought = (thought or "") + b.thinking
            else:
                raise APIError(400, _block_problem(b, m.role), param=f"{where}.type")
        if m.role == "assistant":
            messages.append({"role": "assistant", "content": text, "tool_calls": calls or None,
                             "reasoning_content": thought})
        elif text or isinstance(m.content, str):
            messages.append({"role": "user", "content": text})
    raw = {"model": req.model, "max_tokens": req.max_tokens, "messages": messages, "stop": req.stop_sequences,
           "user": req.metadata.user_id if req.metadata else None, "stream": req.stream,
           "stream_options": {"include_usage": True} if req.stream else None}
    if req.temperature is not None:
        raw["temperature"] = req.temperature
    if req.top_p is not None:
        raw["top_p"] = req.top_p
    if req.tools:
        raw["tools"] = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                          "parameters": t.input_schema}} for t in req.tools]
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool" and not choice.name:
            raise APIError(400, "tool_choice of type `tool` needs `name`: the tool to call", param="tool_choice.name")
        raw["tool_choice"] = ({"type": "function", "function": {"name": choice.name}} if choice.type == "tool"
                              else {"any": "required"}.get(choice.type, choice.type))
        raw["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    if req.thinking is not None:
        raw["thinking_type"] = req.thinking.type
        if req.thinking.type == "enabled":
            if req.thinking.budget_tokens is None:
                raise APIError(400, "thinking of type `enabled` needs `budget_tokens`", param="thinking.budget_tokens")
            if req.thinking.budget_tokens >= req.max_tokens:
                raise APIError(400, "thinking.budget_tokens must be less than max_tokens (max_tokens covers the "
                               "thinking and the answer)", param="thinking.budget_tokens")
            raw["max_reasoning_tokens"] = req.thinking.budget_tokens
        elif req.thinking.type == "disabled":
            raw["max_reasoning_tokens"] = 0
        raw["thinking_omitted"] = req.thinking.display == "omitted"
    if req.output_config is not None and req.output_config.format is not None:
        raw["response_format"] = {"type": "json_schema", "json_schema": {"schema": req.output_config.format.schema_}}
    try:
        return MessagesChat.model_validate(raw)
    except ValidationError as exc:  # a value Anthropic's schema lets through and the chat request does not
        msg, param = validation_message(exc)
        raise APIError(400, msg, param=param) from None


def _result_text(b: Block, where: str) -> str:
    if isinstance(b.content, list):
        if any(c.type != "text" or c.text is None for c in b.content):
            raise APIError(400, f"{where}: a tool_result's content may only hold text blocks on this server",
                           param=f"{where}.content")
        return "".join(c.text for c in b.content)
    return b.content or ""


def _block_problem(b: Block, role: str) -> str:
    known = {"text": "user and assistant", "tool_use": "assistant", "tool_result": "user", "thinking": "assistant"}
    if b.type not in known:
        return (f"content block type '{b.type[:40]}' is not supported by this server; send text, tool_use, "
                "tool_result or thinking blocks")
    if role not in known[b.type]:
        return f"a {b.type} block may only appear in {known[b.type]} messages, not in a {role} message"
    needs = {"text": "text", "tool_use": "id, name and input", "tool_result": "tool_use_id", "thinking": "thinking"}
    return f"a {b.type} block needs {needs[b.type]}"
