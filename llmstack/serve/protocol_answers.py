"""The answers this server sends, as pydantic models, for the OpenAPI document (openapi.py) only: the request path
builds its answers as plain dicts (serving_*.py), and these models say which fields every answer carries and of what
type, so a client generator or a fuzzer (schemathesis's response_schema_conformance check) can hold the server to them.

Written here rather than taken from the `openai` / `anthropic` packages' own types: those are client packages (the
server does not depend on them) and describe OpenAI's and Anthropic's full answers, of which this server sends a
subset. Every model allows fields beyond the ones named (`extra="allow"`), as the APIs themselves grow."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# ------------------------------------------------------------------------------------------------- errors
class OpenAIErrorDetail(_Open):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, not_found_error, "
                                  "rate_limit_error or server_error")
    param: str | None = Field(description="the request field the error is about, if one is")
    code: str | None = Field(description="a stable machine-readable reason, e.g. rate_limit_exceeded")


class OpenAIError(_Open):
    """OpenAI's error body: every error of every route but /v1/messages."""

    error: OpenAIErrorDetail


class AnthropicErrorDetail(_Open):
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, not_found_error, "
                                  "request_too_large, rate_limit_error, api_error or overloaded_error")
    message: str


class AnthropicError(_Open):
    """Anthropic's error body: every error of /v1/messages, the key gate's 401 included."""

    type: Literal["error"]
    error: AnthropicErrorDetail


# ---------------------------------------------------------------------------------------------- generation
class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ToolCallOut(_Open):
    id: str
    type: Literal["function"]
    function: dict


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = None


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict | None


class ChatCompletion(_Open):
    """A chat completion (`stream: false`); with `stream: true` the 200 is a text/event-stream of
    chat.completion.chunk objects, then `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict | None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ResponseUsage(_Open):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class Response(_Open):
    """A Responses API response object: `output` holds message, function_call and reasoning items."""

    id: str
    object: Literal["response"]
    created_at: int
    status: str = Field(description="completed, incomplete, in_progress or failed")
    model: str
    output: list[dict]
    error: dict | None
    incomplete_details: dict | None
    usage: ResponseUsage | None


class ResponseDeleted(_Open):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class MessagesUsage(_Open):
    input_tokens: int
    output_tokens: int


class AnthropicMessage(_Open):
    """An Anthropic Messages answer: text, tool_use and thinking content blocks."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict]
    stop_reason: str | None
    stop_sequence: str | None
    usage: MessagesUsage


# ------------------------------------------------------------------------------------------------ the rest
class Health(_Open):
    status: Literal["ok"]
    engine: str = Field(description="the engine's state: starting, ready, restarting, ...")


class Ready(_Open):
    status: Literal["ready"]
    engine: str
    models: list[str]
    restarts: int
    running: int


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Open):
    """The models (and routes) this key may use."""

    object: Literal["list"]
    data: list[ModelCard]


class TrafficProfile(_Open):
    """Binned feature counts of the prompts served so far (llmstack.monitor); no text."""

    n: int
    bins: dict
    counts: dict


class Adapters(_Open):
    base: str = Field(description="the base model the adapters apply to")
    adapters: dict[str, str] = Field(description="adapter name -> the folder it was loaded from")


class UsageRow(_Open):
    day: str = Field(description="UTC day, YYYY-MM-DD")
    key: str = Field(description="the API key's id (never the key)")
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


class UsageTotals(_Open):
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


class UsageReport(_Open):
    """GET /admin/usage: spend-budget usage per key, model and UTC day in a range of days, with totals."""

    since: str
    until: str
    rows: list[UsageRow]
    totals: UsageTotals


class Routes(RootModel[dict[str, dict]]):
    """Every route by its public name: its primary model, canary (model and weight), shadow and earlier versions
    (what GET /admin/routes lists, and what a change or rollback answers)."""

