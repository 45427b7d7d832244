"""/v1/responses: OpenAI's Responses API over the chat endpoint's guarded path. Nothing of the guard is written twice:
a Responses request is translated into the internal chat request (`translate`: input items, instructions, flat
function tools, text.format, and the conversation `previous_response_id` names, rebuilt from the response store), so
keys, limits, body caps, input rails on every text, the chat template, output rails, audit and metrics are chat's
own; the chat answer is then reshaped into a response object (`respond`) or into the typed Responses events
(`events`, a translation of chat's already-railed stream chunks). Stored responses are responses_store.py's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

from fastapi import Request
from pydantic import Field, ValidationError

from llmstack.config.serve import KeyEntry
from llmstack.serve.admission import admit_request
from llmstack.serve.protocol import APIError, ChatRequest, validation_message
from llmstack.serve.protocol_responses import ResponsesRequest
from llmstack.serve.request import ServedRequest
from llmstack.serve.responses_store import ResponseStoreUnavailable
from llmstack.serve.serving_chat import ChatCompletions
from llmstack.serve.state import Server, new_request_id

log = logging.getLogger("llmstack.serve")


class TranslatedChat(ChatRequest):
    """The internal chat request a Responses request became, with what shaping the answer needs."""

    source: Any = Field(None, exclude=True)  # the ResponsesRequest as the client sent it
    items: list = Field(default_factory=list, exclude=True)  # its input items, as a stored response keeps them


def to_messages(items: list[dict]) -> list[dict]:
    """Responses input items as chat messages: a message as itself, consecutive function_call items as one assistant
    turn's tool_calls, a function_call_output as a tool turn; reasoning items are not rendered."""
    messages: list[dict] = []
    for it in items:
        kind = it.get("type", "message")
        if kind == "message":
            content = it["content"]
            text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
            messages.append({"role": it["role"], "content": text})
        elif kind == "function_call":
            call = {"id": it["call_id"], "type": "function",
                    "function": {"name": it["name"], "arguments": it.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            out = it["output"]
            text = out if isinstance(out, str) else "".join(p.get("text", "") for p in out)
            messages.append({"role": "tool", "tool_call_id": it["call_id"], "content": text})
    return messages


def chat_body(req: ResponsesRequest, history: list[dict]) -> dict:
    """The chat request body a Responses request stands for."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    messages += to_messages(history + req.items())
    body: dict = {"model": req.model, "messages": messages, "stream": bool(req.stream), "user": req.user,
                  "max_completion_tokens": req.max_output_tokens}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    for name in ("temperature", "top_p"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    if req.tools:
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                         for t in req.tools]
    if req.tool_choice is not None:
        tc = req.tool_choice
        body["tool_choice"] = tc if isinstance(tc, str) else {"type": "function", "function": {"name": tc.name}}
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise APIError(400, "text.format.schema is required for type json_schema", param="text.format.schema")
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}}
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    return body


def _usage(u: dict | None) -> dict | None:
    if u is None:
        return None
    details = u.get("completion_tokens_details") or {}
    return {"input_tokens": u["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": u["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": details.get("reasoning_tokens", 0)},
            "total_tokens": u["total_tokens"]}


def _status(finish: str | None) -> tuple[str, dict | None]:
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


class Responses(ChatCompletions):
    route = "/v1/responses"
    id_prefix = "resp"
    schema = ResponsesRequest
    object = "response"

    @staticmethod
    def response_id(rid: str) -> str:
        return "resp_" + rid.split("-", 1)[1]  # the audit line's request_id is resp-<same hex>

    async def translate(self, srv: Server, key: KeyEntry, req: ResponsesRequest) -> TranslatedChat:
        history: list[dict] = []
        if req.previous_response_id is not None:
            try:
                history = await srv.in_worker(srv.responses.history, req.previous_response_id, key.id)
            except ResponseStoreUnavailable as exc:
                raise _store_down(srv, exc) from None
        body = chat_body(req, history)
        try:
            chat = TranslatedChat.model_validate(body)
        except ValidationError as exc:
            msg, param = validation_message(exc)
            raise APIError(400, f"{msg} (in the conversation as chat messages)", param=param) from None
        chat.source, chat.items = req, req.items()
        return chat

    def skeleton(self, call: ServedRequest, status: str = "in_progress") -> dict:
        """The response object with no output yet: what the request asked, echoed as OpenAI echoes it."""
        src: ResponsesRequest = call.req.source
        fmt = src.text.format.model_dump(by_alias=True, exclude_none=True) if src.text and src.text.format else None
        return {"id": self.response_id(call.rid), "object": "response", "created_at": int(time.time()),
                "status": status, "model": call.req.model, "output": [], "error": None, "incomplete_details": None,
                "instructions": src.instructions, "metadata": src.metadata or {},
                "tools": [t.model_dump(exclude_none=True) for t in src.tools or []],
                "tool_choice": (src.tool_choice if isinstance(src.tool_choice, str) or src.tool_choice is None
                                else src.tool_choice.model_dump()) or "auto",
                "parallel_tool_calls": call.req.parallel_tool_calls, "temperature": call.req.temperature,
                "top_p": call.req.top_p, "max_output_tokens": src.max_output_tokens,
                "previous_response_id": src.previous_response_id, "store": src.store is not False,
                "text": {"format": fmt or {"type": "text"}},
                "reasoning": src.reasoning.model_dump() if src.reasoning else None, "usage": None}

    async def respond(self, call: ServedRequest, body):
        if not isinstance(body, dict):  # the client went away (499)
            return body
        choice = body["choices"][0]
        msg, rid = choice["message"], self.response_id(call.rid)
        output = []
        if msg.get("reasoning_content"):
            output.append({"type": "reasoning", "id": f"rs_{rid[5:]}", "summary": [], "status": "completed",
                           "content": [{"type": "reasoning_text", "text": msg["reasoning_content"]}]})
        if msg["content"] or not msg.get("tool_calls") and choice["finish_reason"] != "content_filter":
            output.append(_message_item(rid, msg["content"]))
        for j, tc in enumerate(msg.get("tool_calls") or []):
            output.append(_call_item(rid, j, tc["id"], tc["function"]["name"], tc["function"]["arguments"]))
        resp = self.skeleton(call)
        resp["status"], resp["incomplete_details"] = _status(choice["finish_reason"])
        resp.update(output=output, usage=_usage(body["usage"]))
        await self.keep(call, resp)
        return resp

    async def keep(self, call: ServedRequest, resp: dict) -> None:
        """Store the finished response for its key (store: true), with its input and output items for a later
        previous_response_id; a response over the size cap, or a store that fails, is returned unstored."""
        if not resp["store"]:
            return
        record = {"id": resp["id"], "owner": call.key.id, "previous_response_id": resp["previous_response_id"],
                  "items": call.req.items + resp["output"], "response": resp}
        try:
            stored = await call.srv.in_worker(call.srv.responses.put, record)
        except ResponseStoreUnavailable as exc:
            call.srv.metrics.store_errors.labels("responses").inc()
            log.warning("a response could not be stored (%s); it is returned unstored", exc)
            stored = False
        resp["store"] = stored

    async def events(self, call: ServedRequest, lines):
        """Chat's stream (already through the output rails) as Responses' typed events, each with its
        sequence_number, the way the openai client's ResponseStream accumulates them."""
        stream = _EventStream(self, call)
        async with contextlib.aclosing(lines) as chunks:
            yield stream.event("response.created", response=stream.resp)
            yield stream.event("response.in_progress", response=stream.resp)
            async for line in chunks:
                for event in stream.feed(line):
                    yield event
            if stream.failed:
                return
            for event in stream.close_all():
                yield event
            resp = stream.resp
            resp["status"], resp["incomplete_details"] = _status(stream.finish)
            resp.update(output=stream.output, usage=_usage(stream.usage))
            await self.keep(call, resp)
            yield stream.event("response.completed" if resp["status"] == "completed" else "response.incomplete",
                               response=resp)


def _message_item(rid: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": f"msg_{rid[5:]}", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(rid: str, j: int, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": f"fc_{rid[5:]}_{j}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _store_down(srv: Server, exc: Exception) -> APIError:
    srv.metrics.store_errors.labels("responses").inc()
    return APIError(503, f"the response store is unavailable ({exc}); retry shortly", code="store_unavailable",
                    headers={"Retry-After": "5"})


class _EventStream:
    """One streamed response: the output items open so far (reasoning, message, function calls) and the
    sequence of events that open, fill and close them."""

    def __init__(self, endpoint: Responses, call: ServedRequest):
        self.rid = endpoint.response_id(call.rid)
        self.resp = endpoint.skeleton(call)
        self.seq, self.output, self.open = 0, [], {}  # open: kind -> (output_index, item)
        self.finish, self.usage, self.failed, self.n_calls = None, None, False, 0

    def event(self, kind: str, **fields) -> str:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    def feed(self, line: str):
        if line.startswith("event: error"):
            err = json.loads(line.split("data: ", 1)[1])["error"]
            self.failed = True
            yield self.event("error", code=err.get("code"), message=err["message"], param=err.get("param"))
            self.resp.update(status="failed", error={"code": err.get("code") or "server_error",
                                                     "message": err["message"]}, output=self.output)
            yield self.event("response.failed", response=self.resp)
            return
        if self.failed or not line.startswith("data: {"):
            return  # data: [DONE], or anything after a failure
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            if delta.get("reasoning_content"):
                yield from self._text("reasoning", delta["reasoning_content"])
            if delta.get("content"):
                yield from self.close("reasoning")
                yield from self._text("message", delta["content"])
            for tc in delta.get("tool_calls") or []:
                yield from self._call(tc)
            self.finish = choice["finish_reason"] or self.finish

    def _text(self, kind: str, text: str):
        if kind not in self.open:
            item = (_message_item(self.rid, "", "in_progress") if kind == "message" else
                    {"type": "reasoning", "id": f"rs_{self.rid[5:]}", "summary": [], "status": "in_progress",
                     "content": []})
            item["content"] = []
            self.open[kind] = (len(self.output), item)
            self.output.append(item)
            yield self.event("response.output_item.added", output_index=len(self.output) - 1, item=item)
            if kind == "message":
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                yield self.event("response.content_part.added", item_id=item["id"], output_index=len(self.output) - 1,
                                 content_index=0, part=part)
            item["content"] = [{"type": "output_text", "text": "", "annotations": [], "logprobs": []} if
                               kind == "message" else {"type": "reasoning_text", "text": ""}]
        index, item = self.open[kind]
        item["content"][0]["text"] += text
        name = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        yield self.event(name, item_id=item["id"], output_index=index, content_index=0, delta=text, **extra)

    def _call(self, tc: dict):
        if tc.get("id"):  # a call opens: its name now, its arguments in the next delta (tooling.ToolStream)
            yield from self.close("reasoning")
            yield from self.close("message")
            item = _call_item(self.rid, self.n_calls, tc["id"], tc["function"]["name"], "", "in_progress")
            self.n_calls += 1
            self.open["call"] = (len(self.output), item)
            self.output.append(item)
            yield self.event("response.output_item.added", output_index=len(self.output) - 1, item=item)
            return
        index, item = self.open["call"]
        args = tc["function"]["arguments"]
        item["arguments"] += args
        yield self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                         delta=args)
        yield from self.close("call")

    def close(self, kind: str):
        if kind not in self.open:
            return
        index, item = self.open.pop(kind)
        item["status"] = "completed"
        if kind == "call":
            yield self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                             arguments=item["arguments"], name=item["name"])
        elif kind == "message":
            part = item["content"][0]
            yield self.event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                             text=part["text"], logprobs=[])
            yield self.event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                             part=part)
        else:
            yield self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                             content_index=0, text=item["content"][0]["text"])
        yield self.event("response.output_item.done", output_index=index, item=item)

    def close_all(self):
        for kind in ("reasoning", "message", "call"):
            yield from self.close(kind)


async def stored_response(request: Request, srv: Server, response_id: str, delete: bool) -> dict:
    """GET / DELETE /v1/responses/{id}: charged to the key's requests per minute like any call; a response of
    another key is 404, the same as one that never was."""
    key: KeyEntry = request.state.key
    audit = {"request_id": new_request_id("resp"), "key_id": key.id, "route": Responses.route,
             "action": "delete" if delete else "retrieve", "guard": []}
    await admit_request(srv, key, audit)
    try:
        if delete:
            found = await srv.in_worker(srv.responses.delete, response_id[:200], key.id)
        else:
            rec = await srv.in_worker(srv.responses.get, response_id[:200], key.id)
            found = rec is not None
    except ResponseStoreUnavailable as exc:
        raise _store_down(srv, exc) from None
    if not found:
        raise APIError(404, f"No response found with id '{response_id[:200]}'.", param="response_id",
                       code="response_not_found")
    audit["status"] = 200
    srv.audit.write(audit)
    return {"id": response_id, "object": "response.deleted", "deleted": True} if delete else rec["response"]
