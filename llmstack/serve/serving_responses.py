"""/v1/responses: OpenAI's Responses API over the chat endpoint's guarded path. Nothing of the guard is written twice:
a Responses request is translated into the internal chat request (`translate`: input items, instructions, flat
function tools, text.format, and the conversation `previous_response_id` names, rebuilt from the response store), so
keys, limits, body caps, input rails on every text, the chat template, output rails, audit and metrics are chat's
own; the chat answer is then reshaped into a response object (`respond`) or into the typed Responses events
(`events`: chat's already-railed stream chunks as typed events, responses_stream.py); chat's 400s name the
Responses field they are about (`input[3].arguments`, not `messages[2]…`). Stored responses are responses_store.py's.
"""

from __future__ import annotations

import contextlib
import logging
import re
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
from llmstack.serve.responses_stream import EventStream, call_item, message_item
from llmstack.serve.serving_chat import ChatCompletions
from llmstack.serve.state import Server, new_request_id, set_body_bytes

log = logging.getLogger("llmstack.serve")


class TranslatedChat(ChatRequest):
    """The internal chat request a Responses request became, with what shaping the answer needs."""

    source: Any = Field(None, exclude=True)  # the ResponsesRequest as the client sent it
    items: list = Field(default_factory=list, exclude=True)  # its input items, as a stored response keeps them
    origins: list = Field(default_factory=list, exclude=True)  # per chat message: the Responses field it came from


_OUTPUT_FIELDS = {".content": ".output", ".tool_call_id": ".call_id"}  # a tool turn's fields, as its item names them


def to_messages(items: list[dict], labels: list[str]) -> tuple[list[dict], list[dict]]:
    """Responses input items as chat messages — a message as itself, consecutive function_call items as one assistant
    turn's tool_calls, a function_call_output as a tool turn; reasoning items are not rendered — and per message where
    it came from (`labels[k]` names item k: `input[3]`), so chat's 400s can name the Responses field."""
    messages: list[dict] = []
    origins: list[dict] = []
    for it, label in zip(items, labels, strict=True):
        kind = it.get("type", "message")
        if kind == "message":
            content = it["content"]
            text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
            messages.append({"role": it["role"], "content": text})
            origins.append({"label": label, "calls": []})
        elif kind == "function_call":
            call = {"id": it["call_id"], "type": "function",
                    "function": {"name": it["name"], "arguments": it.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
                origins[-1]["calls"].append(label)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
                origins.append({"label": label, "calls": [label]})
        elif kind == "function_call_output":
            out = it["output"]
            text = out if isinstance(out, str) else "".join(p.get("text", "") for p in out)
            messages.append({"role": "tool", "tool_call_id": it["call_id"], "content": text})
            origins.append({"label": label, "calls": [], "renamed": _OUTPUT_FIELDS})
    return messages, origins


_MESSAGE_PARAM = re.compile(r"messages\[(\d+)\]((?:\.tool_calls\[(\d+)\](?:\.function)?)?)([.\w\[\]]*)")
_RENAMED = {"max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
            "response_format": "text.format", "messages": "input"}


def source_param(param: str | None, origins: list[dict]) -> str | None:
    """A chat request's field (`messages[2].tool_calls[0].function.arguments`) as the Responses field it came from
    (`input[3].arguments`); an earlier response's items are all `previous_response_id`."""
    if not param:
        return param
    m = _MESSAGE_PARAM.fullmatch(param)
    if m is None:
        head, _, rest = param.partition(".")
        param = _RENAMED.get(head, head) + ("." + rest if rest else "")
        return param.replace(".function.", ".").replace("].function", "]")
    i = int(m[1])
    if i >= len(origins):
        return "input"
    origin = origins[i]
    label = origin["calls"][int(m[3])] if m[3] is not None and int(m[3]) < len(origin["calls"]) else origin["label"]
    if label in ("previous_response_id", "instructions", "input"):  # one text: no sub-field
        return label
    rest = m[4]
    for chat_name, own in origin.get("renamed", {}).items():
        if rest.startswith(chat_name):
            rest = own + rest[len(chat_name):]
    return label + rest


def chat_body(req: ResponsesRequest, history: list[dict]) -> tuple[dict, list[dict]]:
    """The chat request body a Responses request stands for, and where each of its messages came from."""
    items = req.items()
    labels = ["previous_response_id"] * len(history) + (
        ["input"] if isinstance(req.input, str) else [f"input[{k}]" for k in range(len(items))])
    messages, origins = to_messages(history + items, labels)
    if req.instructions:
        messages.insert(0, {"role": "system", "content": req.instructions})
        origins.insert(0, {"label": "instructions", "calls": []})
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
    return body, origins


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
    prompt_param = "input"
    max_tokens_param = "max_output_tokens"

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
            set_body_bytes(None)  # a stored conversation of any length joins the prompt: its work goes to a thread
        body, origins = chat_body(req, history)
        try:
            chat = TranslatedChat.model_validate(body)
        except ValidationError as exc:
            msg, param = validation_message(exc)
            raise _retarget(APIError(400, msg, param=param), origins) from None
        chat.source, chat.items, chat.origins = req, req.items(), origins
        return chat

    # chat's own checks, their 400s naming the Responses field (input[3].arguments) instead of chat's
    async def prepare(self, srv: Server, req: TranslatedChat):
        with _retargeted(req):
            return await super().prepare(srv, req)

    async def structured(self, srv: Server, req: TranslatedChat, plan):
        with _retargeted(req):
            return await super().structured(srv, req, plan)

    def thinking(self, srv: Server, req: TranslatedChat, key: KeyEntry, params, structured: bool):
        with _retargeted(req):
            return super().thinking(srv, req, key, params, structured)

    def render(self, srv: Server, req: TranslatedChat, guard, plan, thinking=None):
        with _retargeted(req):
            return super().render(srv, req, guard, plan, thinking)

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
            output.append(message_item(rid, msg["content"]))
        for j, tc in enumerate(msg.get("tool_calls") or []):
            output.append(call_item(rid, j, tc["id"], tc["function"]["name"], tc["function"]["arguments"]))
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
        stream = EventStream(self.skeleton(call))
        # Each chat chunk becomes one write of all the events it makes (an item opening, a part opening and the
        # delta are three events, one send): a Responses stream carries several times chat's events.
        async with contextlib.aclosing(lines) as chunks:
            yield (stream.event("response.created", response=stream.resp)
                   + stream.event("response.in_progress", response=stream.resp))
            async for line in chunks:
                events = "".join(stream.feed(line))
                if events:
                    yield events
            if stream.failed:
                return
            closing = "".join(stream.close_all())
            resp = stream.resp
            resp["status"], resp["incomplete_details"] = _status(stream.finish)
            resp.update(output=stream.output, usage=_usage(stream.usage))
            await self.keep(call, resp)
            yield closing + stream.event("response.completed" if resp["status"] == "completed"
                                         else "response.incomplete", response=resp)


def _retarget(exc: APIError, origins: list[dict]) -> APIError:
    if exc.param:
        new = source_param(exc.param, origins)
        exc.message = exc.message.replace(exc.param, new)
        exc.param = new
        exc.args = (exc.message,)
    return exc


@contextlib.contextmanager
def _retargeted(req: TranslatedChat):
    try:
        yield
    except APIError as exc:
        raise _retarget(exc, req.origins) from None


def _store_down(srv: Server, exc: Exception) -> APIError:
    srv.metrics.store_errors.labels("responses").inc()
    return APIError(503, f"the response store is unavailable ({exc}); retry shortly", code="store_unavailable",
                    headers={"Retry-After": "5"})


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
