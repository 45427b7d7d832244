"""The wire of OpenAI's Responses API (`POST /v1/responses`) as this server accepts it: the request, its input items
and its flat function tools, following the shapes the installed `openai` client sends (openai/types/responses/).
Fields we do not use (metadata, include, truncation, prompt_cache_key, ...) are accepted and ignored, as the chat
schemas do; a tool or item type this server cannot serve (web_search, file inputs, ...) is a 400 that names it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag

from llmstack.serve.protocol import FUNCTION_NAME, Integer, _Loose


class TextPart(_Loose):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(_Loose):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Loose):
    """An earlier call of the model's, sent back (its `call_id` is what the function_call_output answers)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=200)
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str = "{}"


class FunctionCallOutputItem(_Loose):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=200)
    output: str | list[TextPart]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class ReasoningItem(_Loose):
    """An earlier reasoning item sent back (the Agents SDK replays every output item): accepted, never rendered —
    a model's earlier thinking is not part of the next prompt, as chat templates drop it too."""

    type: Literal["reasoning"]


def _item_kind(v) -> str:
    kind = v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", "message")
    return kind if kind in ("message", "function_call", "function_call_output", "reasoning") else "unsupported"


class _Unsupported(_Loose):
    type: Literal["message", "function_call", "function_call_output", "reasoning"]  # always fails: names the choices


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                      | Annotated[ReasoningItem, Tag("reasoning")] | Annotated[_Unsupported, Tag("unsupported")],
                      Discriminator(_item_kind)]


class FunctionTool(_Loose):
    """Responses' flat function tool (chat nests the same fields under `function`)."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class NamedFunction(_Loose):
    type: Literal["function"]
    name: str


class TextFormat(_Loose):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "response"
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Loose):
    format: TextFormat | None = None


class ReasoningConfig(_Loose):
    effort: str | None = None  # accepted and ignored: the thinking budget is the server's (guard policy)
    summary: str | None = None


class ResponsesRequest(_Loose):
    model: str
    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Integer | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfig | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=200)
    store: bool | None = None  # None: true, as OpenAI
    stream: bool | None = None
    reasoning: ReasoningConfig | None = None
    user: str | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)  # echoed back, as OpenAI does (16 pairs)

    def items(self) -> list[dict]:
        """The input as items in their wire shape (a string is one user message), as a stored response keeps them."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return [i.model_dump(by_alias=True, exclude_none=True) for i in self.input]
