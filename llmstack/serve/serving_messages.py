"""/v1/messages: Anthropic's Messages API over the shared request path (serving.py). The request is translated into
the internal chat request (protocol_messages.to_chat) and served exactly as /v1/chat/completions serves one — the same
key gate, limits, body caps, input rails on every text (system, messages, tool results, earlier tool_use input, tool
specs), chat template, tool planning and forced-call grammars, output rails, audit and metrics — so this module only
translates: the chat answer back into a `message` (`respond`) and the chat stream's chunks into Anthropic's event
sequence (`events`). Errors are Anthropic-shaped (protocol_messages.error_body; app.py picks the shape by route)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator

from llmstack.config.serve import KeyEntry
from llmstack.serve.engines import GenParams
from llmstack.serve.protocol import APIError
from llmstack.serve.protocol_messages import STOP_REASONS, MessagesBody, error_body
from llmstack.serve.reasoning import Thinking
from llmstack.serve.request import ServedRequest
from llmstack.serve.serving_chat import ChatCompletions
from llmstack.serve.state import Server


def message_id(rid: str) -> str:
    """Anthropic's id form (`msg_…`) of the request id the audit line and X-Request-Id carry (`msg-…`)."""
    return rid.replace("-", "_", 1)


class Messages(ChatCompletions):
    route = "/v1/messages"
    id_prefix = "msg"
    schema = MessagesBody

    def thinking(self, srv: Server, req, key: KeyEntry, params: GenParams, structured: bool) -> Thinking | None:
        if srv.reasoning_parser is None and req.thinking_type is not None:
            if req.thinking_type == "enabled":
                raise APIError(400, "thinking: this model does not think (its chat template renders no thinking); "
                               "leave `thinking` out or send {\"type\": \"disabled\"}", param="thinking")
            req.max_reasoning_tokens = None  # disabled on a model that never thinks: nothing to turn off
        thinking = super().thinking(srv, req, key, params, structured)
        if thinking is not None and req.thinking_omitted:
            thinking.policy = "hide"  # the strictest policy: a request may ask for less than its key allows, not more
        return thinking

    async def respond(self, call: ServedRequest, body):
        """The chat answer (one choice) as Anthropic's `message`: thinking (as the guard's thinking policy lets it
        out: none under `hide`), then text, then tool_use blocks."""
        if not isinstance(body, dict):  # the client went away (499)
            return body
        choice = body["choices"][0]
        msg, content = choice["message"], []
        if msg.get("reasoning_content") is not None:
            content.append({"type": "thinking", "thinking": msg["reasoning_content"], "signature": ""})
        if msg.get("content"):
            content.append({"type": "text", "text": msg["content"]})
        for c in msg.get("tool_calls") or []:
            content.append({"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                            "input": json.loads(c["function"]["arguments"])})
        return {"id": message_id(call.rid), "type": "message", "role": "assistant", "model": body["model"],
                "content": content, **stop(call, choice["finish_reason"]),
                "usage": {"input_tokens": body["usage"]["prompt_tokens"],
                          "output_tokens": body["usage"]["completion_tokens"]}}

    async def events(self, call: ServedRequest, lines: AsyncIterator[str]) -> AsyncIterator[str]:
        """The chat stream (already through the output rails) as Anthropic's events. Closing this closes the chat
        stream, which aborts the engine call and writes the audit line."""
        out = EventStream(call)
        async with contextlib.aclosing(lines) as chat:
            async for line in chat:
                events = "".join(out.feed(line))  # one write for what one chat chunk becomes (often several events)
                if events:
                    yield events


def stop(call: ServedRequest, finish: str | None) -> dict:
    """Anthropic's stop_reason and stop_sequence: `stop_sequence` when the engine says a stop string ended it."""
    sequence = call.stopped_by.get(0) if finish == "stop" else None
    reason = "stop_sequence" if sequence is not None else STOP_REASONS.get(finish, "end_turn")
    return {"stop_reason": reason, "stop_sequence": sequence}


def sse_event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class EventStream:
    """One chat stream's chunks as Anthropic's events: message_start and a ping first; per content block (thinking,
    text, each tool_use) a content_block_start, its deltas (thinking_delta, text_delta, input_json_delta) and a
    content_block_stop; then message_delta (stop_reason, output tokens) and message_stop. An error event of the chat
    stream (an output rail that blocks, an engine failure) becomes Anthropic's `error` event, which ends the stream."""

    def __init__(self, call: ServedRequest):
        self.call, self.index, self.open = call, -1, None  # the current block's index and type
        self.started, self.finish = False, "stop"

    def feed(self, line: str) -> Iterator[str]:
        head, _, data = line.partition("data: ")
        data = data.strip()
        if data == "[DONE]" or not data:
            return
        chunk = json.loads(data)
        if head.startswith("event: error"):
            err = chunk["error"]
            status = {"server_error": 503 if err.get("code") == "engine_unavailable" else 500}.get(err["type"], 400)
            yield sse_event("error", {"error": error_body(APIError(status, err["message"]))["error"]})
            return
        if not self.started:
            self.started = True
            call = self.call
            yield sse_event("message_start", {"message": {
                "id": message_id(call.rid), "type": "message", "role": "assistant", "model": call.req.model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": len(call.prompt_ids), "output_tokens": 0}}})
            yield sse_event("ping", {})
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("reasoning_content"):
                yield from self._block("thinking", {"thinking": "", "signature": ""})
                yield self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]})
            if delta.get("content"):
                yield from self._block("text", {"text": ""})
                yield self._delta({"type": "text_delta", "text": delta["content"]})
            for tc in delta.get("tool_calls") or []:
                if tc.get("id"):  # a new call: its own block
                    yield from self._block("tool_use", {"id": tc["id"], "name": tc["function"]["name"],
                                                        "input": {}}, new=True)
                if tc["function"].get("arguments"):
                    yield self._delta({"type": "input_json_delta", "partial_json": tc["function"]["arguments"]})
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
                yield from self._close()
        if chunk.get("usage") and not chunk["choices"]:  # the chat stream's last chunk: its usage
            yield from self._close()
            yield sse_event("message_delta", {"delta": stop(self.call, self.finish),
                                              "usage": {"output_tokens": chunk["usage"]["completion_tokens"]}})
            yield sse_event("message_stop", {})

    def _block(self, kind: str, start: dict, new: bool = False) -> Iterator[str]:
        if self.open == kind and not new:
            return
        yield from self._close()
        self.index += 1
        self.open = kind
        yield sse_event("content_block_start", {"index": self.index, "content_block": {"type": kind, **start}})

    def _delta(self, delta: dict) -> str:
        return sse_event("content_block_delta", {"index": self.index, "delta": delta})

    def _close(self) -> Iterator[str]:
        if self.open is not None:
            self.open = None
            yield sse_event("content_block_stop", {"index": self.index})
