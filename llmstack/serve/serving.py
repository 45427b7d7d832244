"""The request path of /v1/chat/completions and /v1/completions, after the key gate (app.py) let a request in:

parse (400) -> model allowlist (404/403) -> canary/shadow pick -> caps (400) -> input rails (400 / redact) -> chat
template + context check (400) -> rate limits (429) -> engine slot (bounded queue: 503) -> `Call.complete` (JSON) or
`Call.stream` (SSE), each with output rails -> audit line + metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from llmstack.config.serve import GuardPolicy, KeyEntry, Route, ServeSpec
from llmstack.serve.audit import AuditLog
from llmstack.serve.engines import EngineRejected, EngineUnavailable, GenParams
from llmstack.serve.guard import KeyRing, RateLimiter, StreamRail, check_text
from llmstack.serve.metrics import ServeMetrics
from llmstack.serve.protocol import (APIError, ChatRequest, CompletionRequest, chat_logprobs, completion_logprobs,
                                     sse, usage, validation_message)
from llmstack.serve.routing import Router

log = logging.getLogger("llmstack.serve")


# ------------------------------------------------------------------------------------------------ server state
@dataclass
class Server:
    engine: Any
    spec: ServeSpec
    policy: GuardPolicy
    keyring: KeyRing
    limiter: RateLimiter
    metrics: ServeMetrics
    audit: AuditLog
    router: Router = field(default_factory=Router)
    traffic: Any = None  # llmstack.monitor.TrafficProfile: binned counts of live prompts (never the text)
    drift_reference: Any = None  # the training data's profile, when serve.drift_reference is set
    background: set = field(default_factory=set)  # shadow generations in flight (kept referenced until done)
    slots: asyncio.Semaphore = field(init=False)
    waiting: int = 0

    def __post_init__(self):
        self.slots = asyncio.Semaphore(self.spec.max_concurrency)

    def public_names(self) -> list[str]:
        """What clients may ask for: the engine's models and adapters, then route names that are not one of them."""
        return [*self.engine.names, *[r for r in self.router.names() if r not in self.engine.names]]

    @contextlib.asynccontextmanager
    async def slot(self):
        """A place in the engine's bounded queue: past max_queue waiting requests, refuse instead of piling up."""
        if self.slots.locked() and self.waiting >= self.spec.max_queue:
            self.metrics.guard_blocks.labels("queue_full").inc()
            raise APIError(503, "the server is at capacity; retry shortly", code="server_overloaded",
                           headers={"Retry-After": "1"})
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            await asyncio.wait_for(self.slots.acquire(), timeout=self.spec.queue_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(503, f"waited {self.spec.queue_timeout_s:.0f} s for an engine slot; retry shortly",
                           code="server_overloaded", headers={"Retry-After": "1"}) from None
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.metrics.in_flight.dec()
            self.slots.release()


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def read_json(request: Request, srv: Server, schema: type[BaseModel]):
    cap = srv.policy.caps.max_body_bytes
    body = b""
    async for chunk in request.stream():  # chunked bodies have no Content-Length: count while reading
        body += chunk
        if len(body) > cap:
            srv.metrics.guard_blocks.labels("body_too_large").inc()
            raise APIError(413, f"request body is over the {cap}-byte limit", code="request_too_large")
    try:
        raw = json.loads(body or b"null")
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        msg, param = validation_message(exc)
        raise APIError(400, msg, param=param) from None


def gen_params(req, chat: bool, caps, spec_json: dict | None, json_object: bool) -> GenParams:
    max_tokens = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
    if max_tokens is None:
        max_tokens = caps.default_max_tokens
    echo = not chat and req.echo
    if echo and req.stream:
        raise APIError(400, "echo is not supported with stream=true; send stream=false to get the prompt back",
                       param="echo")
    if max_tokens == 0 and not echo:
        raise APIError(400, "max_tokens 0 generates nothing: it is only allowed with echo=true (to score the prompt)",
                       param="max_tokens")
    if max_tokens > caps.max_tokens:
        raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {caps.max_tokens}",
                       param="max_tokens", code="max_tokens_exceeded")
    if req.n > caps.max_n:
        raise APIError(400, f"n is {req.n}; this server allows at most {caps.max_n}", param="n")
    stops = req.stops()
    if len(stops) > caps.max_stop:
        raise APIError(400, f"at most {caps.max_stop} stop sequences", param="stop")
    k = None
    if chat and req.logprobs:
        k = req.top_logprobs or 0
    elif not chat and req.logprobs is not None:
        k = req.logprobs
    if k is not None and k > caps.max_logprobs:
        raise APIError(400, f"at most {caps.max_logprobs} top logprobs", param="top_logprobs" if chat else "logprobs")
    # echo + max_tokens 0: the engine still takes one step (vLLM needs max_tokens >= 1, as its own server does);
    # _complete drops that token.
    return GenParams(max_tokens=max(max_tokens, 1), temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                     n=req.n, stop=stops, logprobs=k, prompt_logprobs=k if echo else None, json_schema=spec_json,
                     json_object=json_object, ignore_eos=req.ignore_eos)


async def generate(request: Request, srv: Server, chat: bool):
    t0 = time.perf_counter()
    key: KeyEntry = request.state.key
    route = "/v1/chat/completions" if chat else "/v1/completions"
    rid = new_request_id("chatcmpl" if chat else "cmpl")
    audit = {"request_id": rid, "key_id": key.id, "route": route, "guard": []}
    try:
        req = await read_json(request, srv, ChatRequest if chat else CompletionRequest)
        audit["model"] = req.model
        known = srv.public_names()
        if req.model not in known:
            raise APIError(404, f"model '{req.model}' does not exist; this server has: {', '.join(known)}",
                           param="model", code="model_not_found")
        if not KeyRing.allows(key, req.model):
            srv.metrics.guard_blocks.labels("model_not_allowed").inc()
            raise APIError(403, f"this API key may not use model '{req.model}'", param="model",
                           code="model_not_allowed")
        # ---- canary / shadow: the public name picks a serving version; the response names the version that answered
        public = req.model
        req.model, arm, shadow = srv.router.pick(public, req.user or rid)
        if public in srv.router.names():
            audit.update(served_by=req.model, arm=arm)
            srv.metrics.routed.labels(public, req.model, arm).inc()
        schema, json_object = None, False
        if chat and req.response_format is not None and req.response_format.type != "text":
            if req.response_format.type == "json_schema":
                if req.response_format.json_schema is None:
                    raise APIError(400, "response_format.json_schema is required for type json_schema",
                                   param="response_format")
                schema = req.response_format.json_schema.schema_
            else:
                json_object = True
        params = gen_params(req, chat, srv.policy.caps, schema, json_object)

        # ---- input rails, then the prompt tokens the engine will see
        prompt_ids, prompt_text = render(req, chat, srv, audit)
        await anyio.to_thread.run_sync(srv.traffic.observe, user_text(req, chat))
        n_prompt = len(prompt_ids)
        context = srv.engine.max_model_len
        if n_prompt + params.max_tokens > context:
            raise APIError(400, f"this model's context is {context} tokens; the prompt has {n_prompt} "
                           f"and max_tokens asks for {params.max_tokens} more. Shorten the prompt or lower max_tokens.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")

        # ---- rate limits: the request, and its worst-case tokens
        refused = await srv.limiter.admit(key, n_prompt + params.max_tokens * params.n)
        if refused:
            which, retry = refused
            srv.metrics.guard_blocks.labels(f"rate_limit:{which}").inc()
            audit["guard"].append(f"rate_limit:{which}")
            raise APIError(429, f"rate limit reached for key '{key.id}' ({which}); retry in {retry:.0f} s",
                           code="rate_limit_exceeded", headers={"Retry-After": str(int(retry + 0.999))})
    except APIError as exc:
        audit.update(status=exc.status, error=exc.code or exc.message, latency_s=round(time.perf_counter() - t0, 4))
        srv.audit.write(audit)
        raise

    srv.metrics.tokens.labels("prompt").inc(n_prompt)
    audit["prompt_tokens"] = n_prompt
    call = Call(srv=srv, rid=rid, req=req, params=params, prompt_ids=prompt_ids, prompt_text=prompt_text, chat=chat,
                route=route, audit=audit, t0=t0)
    if shadow:
        task = asyncio.create_task(run_shadow(srv, shadow, public, rid, prompt_ids, params))
        srv.background.add(task)
        task.add_done_callback(srv.background.discard)
    if req.stream:
        slot = srv.slot()
        try:
            await slot.__aenter__()  # refuse (503) before the 200 of the stream goes out
        except APIError as exc:
            audit.update(status=exc.status, error=exc.code, latency_s=round(time.perf_counter() - t0, 4))
            srv.audit.write(audit)
            raise
        return ClosingStreamingResponse(call.stream(slot), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
    return await call.complete(request)


def user_text(req, chat: bool) -> str:
    """What the end user wrote (the last user turn, or the prompt): the text drift is measured on."""
    if chat:
        return next((m.text() for m in reversed(req.messages) if m.role == "user"), "")
    return req.prompt if isinstance(req.prompt, str) else ""


def check_routes(routes: dict[str, Route], served: list[str]) -> None:
    for name, r in routes.items():
        missing = [m for m in (r.primary, r.canary.model if r.canary else None, r.shadow) if m and m not in served]
        if missing:
            raise ValueError(f"routes.{name}: {', '.join(missing)} is not served here (served: {', '.join(served)})")


async def run_shadow(srv: Server, model: str, public: str, rid: str, prompt_ids: list[int], params: GenParams) -> None:
    """Run the same request on the shadow version; its answer goes to the audit log (and metrics), never to the
    client. It waits for a free engine slot like any request, and gives up rather than queue past the limit."""
    t0, texts, n_out, status = time.perf_counter(), [""] * params.n, 0, 200
    try:
        async with srv.slot():
            async for deltas in srv.engine.generate(rid + "-shadow", prompt_ids, params, model):
                for d in deltas:
                    texts[d.index] += d.text
                    n_out += len(d.token_ids)
    except APIError as exc:
        status = exc.status
    except Exception as exc:  # noqa: BLE001 - a failing shadow must never touch the live request
        log.warning("shadow %s failed: %s", model, exc)
        status = 500
    latency = time.perf_counter() - t0
    srv.metrics.routed.labels(public, model, "shadow").inc()
    if status == 200:
        srv.metrics.version_latency.labels(model, "shadow").observe(latency)
    else:
        srv.metrics.version_errors.labels(model, "shadow").inc()
    srv.audit.write({"request_id": rid, "shadow": True, "model": public, "served_by": model, "arm": "shadow",
                     "status": status, "completion_tokens": n_out, "latency_s": round(latency, 4)},
                    completion=texts)


class ClosingStreamingResponse(StreamingResponse):
    """Closes the body generator when the response ends, however it ends. After a client disconnect Starlette only
    cancels the sending task: a generator paused at a `yield` would otherwise wait for the garbage collector (its
    frames sit in a traceback cycle) before its `finally` aborts the engine request and frees the slot."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def render(req, chat: bool, srv: Server, audit: dict) -> tuple[list[int], str]:
    rails = srv.policy.input
    tok = srv.engine.tokenizer

    def guard(text: str, param: str) -> str:
        v = check_text(text, rails)
        audit["guard"] += v.decisions
        if v.blocked:
            srv.metrics.guard_blocks.labels(f"input:{v.blocked}").inc()
            what = {"injection": "looks like a prompt-injection attempt", "pii": "contains personal data",
                    "blocklist": "contains a blocked term"}[v.blocked]
            raise APIError(400, f"the request was refused by the input guard: it {what}", param=param,
                           code=f"input_{v.blocked}")
        return v.text

    if chat:
        messages = []
        for i, m in enumerate(req.messages):
            text = m.text()
            if m.role in ("user", "tool"):  # system/developer text comes from the app owner, not the end user
                text = guard(text, f"messages[{i}].content")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        # Rendered to text, then tokenized without extra specials: the same prompt tokens vLLM's own server makes.
        prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(prompt_text, add_special_tokens=False)["input_ids"], prompt_text
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        if len(prompt) != 1:  # a batch of prompts (texts or token lists), as lm-eval and vLLM's server send
            raise APIError(400, "send one prompt per request (a list of several prompts is not supported)",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):  # token ids: used as given (as OpenAI and vLLM do), so scoring sees exact tokens
        if not prompt or not all(0 <= t < len(tok) for t in prompt):
            raise APIError(400, f"prompt token ids must be a non-empty list of ids in [0, {len(tok)})",
                           param="prompt")
        text = tok.decode(prompt)
        checked = guard(text, "prompt")
        return (prompt if checked == text else tok(checked)["input_ids"]), checked
    prompt = guard(prompt, "prompt")
    return tok(prompt)["input_ids"], prompt


@dataclass
class Call:
    """One generation request that passed every check: what the engine is asked, and the audit line it fills in."""

    srv: Server
    rid: str
    req: Any  # ChatRequest | CompletionRequest
    params: GenParams
    prompt_ids: list[int]
    prompt_text: str
    chat: bool
    route: str
    audit: dict
    t0: float

    def _fields(self):
        return (self.srv, self.rid, self.req, self.params, self.prompt_ids, self.prompt_text, self.chat, self.route,
                self.audit, self.t0)

    async def complete(self, request: Request):
        """The whole answer as one JSON body; a client that hangs up first aborts the engine request."""
        srv, rid, req, params, prompt_ids, prompt_text, chat, route, audit, t0 = self._fields()
        texts = [""] * params.n
        lps: list[list[dict]] = [[] for _ in range(params.n)]
        prompt_lps: list[dict | None] = []
        finish: list[str | None] = [None] * params.n
        n_out = 0
        ttft = None
        status = 200

        async def run():
            nonlocal n_out, ttft
            async for deltas in srv.engine.generate(rid, prompt_ids, params, req.model):
                for d in deltas:
                    if ttft is None and d.token_ids:
                        ttft = time.perf_counter() - t0
                    texts[d.index] += d.text
                    n_out += len(d.token_ids)
                    lps[d.index] += d.logprobs or []
                    if d.prompt_logprobs:
                        prompt_lps[:] = d.prompt_logprobs
                    finish[d.index] = d.finish_reason or finish[d.index]

        try:
            async with srv.slot():
                task = asyncio.create_task(run())
                # A client that hangs up before the answer is ready should not keep the engine busy: poll for it.
                while not task.done():
                    await asyncio.wait({task}, timeout=0.25)
                    if not task.done() and await request.is_disconnected():
                        task.cancel()
                        srv.metrics.aborted.inc()
                        audit["guard"].append("client_disconnected")
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                        status = 499
                        return Response(status_code=499)
                task.result()
        except EngineUnavailable as exc:
            status = 503
            raise APIError(503, f"the model engine is unavailable ({exc}); retry shortly", code="engine_unavailable",
                           headers={"Retry-After": "5"}) from None
        except EngineRejected as exc:
            status = 400
            raise APIError(400, str(exc)) from None
        except APIError as exc:
            status = exc.status
            raise
        finally:
            if status != 200:
                if "arm" in audit:
                    srv.metrics.version_errors.labels(req.model, audit["arm"]).inc()
                audit.update(status=status, latency_s=round(time.perf_counter() - t0, 4), completion_tokens=n_out)
                srv.audit.write(audit, prompt=prompt_text, completion=texts)

        echo = not chat and req.echo
        if echo and req.max_tokens == 0:  # scoring only: drop the one step the engine had to take
            texts, lps, finish, n_out = [""] * params.n, [[] for _ in range(params.n)], ["length"] * params.n, 0
        if echo and params.logprobs is not None and len(prompt_lps) != len(prompt_ids):
            raise APIError(500, f"the engine returned {len(prompt_lps)} prompt logprobs for {len(prompt_ids)} prompt "
                           "tokens", code="internal_error")  # never hand out misaligned scores
        choices = []
        for i in range(params.n):
            v = check_text(texts[i], srv.policy.output)
            audit["guard"] += v.decisions
            reason = finish[i] or "length"
            text, rows = v.text, lps[i]
            if v.blocked:  # the output rail withholds this choice (as OpenAI/Azure content filters do), logprobs too
                srv.metrics.guard_blocks.labels(f"output:{v.blocked}").inc()
                text, rows, reason = "", [], "content_filter"
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                          "logprobs": chat_logprobs(rows) if params.logprobs is not None else None}
            else:
                if echo:  # the prompt (as the input guard passed it) before the completion, its logprobs before theirs
                    text = prompt_text + text
                    rows = [*prompt_lps, *rows]
                first = srv.engine.tokenizer.decode(prompt_ids[:1]) if echo else ""
                choice = {"index": i, "text": text, "finish_reason": reason,
                          "logprobs": completion_logprobs(rows, first) if params.logprobs is not None else None}
            choices.append(choice)
        _finish_metrics(srv, route, n_out, ttft)
        if "arm" in audit:
            srv.metrics.version_latency.labels(req.model, audit["arm"]).observe(time.perf_counter() - t0)
        audit.update(status=200, completion_tokens=n_out, latency_s=round(time.perf_counter() - t0, 4),
                     ttft_s=round(ttft, 4) if ttft else None, finish=[c["finish_reason"] for c in choices])
        srv.audit.write(audit, prompt=prompt_text, completion=texts)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": req.model, "choices": choices, "usage": usage(len(prompt_ids), n_out)}

    async def stream(self, slot):
        """Server-sent events, each delta through the output rails; the slot is held until the stream ends."""
        srv, rid, req, params, prompt_ids, prompt_text, chat, route, audit, t0 = self._fields()
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        rails = [StreamRail(srv.policy.output, srv.policy.output.holdback_chars) for _ in range(params.n)]
        texts = [""] * params.n
        n_out, ttft, status = 0, None, 200
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index: int, text: str | None = None, finish: str | None = None, lp: list[dict] | None = None,
                  role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "finish_reason": finish,
                          "logprobs": chat_logprobs(lp) if lp else None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish,
                          "logprobs": completion_logprobs(lp) if lp else None}
            body = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return sse(body)

        gen = srv.engine.generate(rid, prompt_ids, params, req.model)
        done = False  # still False in `finally` means the client went away (cancelled, or the generator was closed)
        try:
            if chat:
                for i in range(params.n):
                    yield chunk(i, role=True)
            async for deltas in gen:
                # A turn for the event loop per engine step. When the engine is ahead of this process, vLLM's output
                # queue is never empty and sending does not suspend either (until the socket buffer fills), so nothing
                # else — Starlette's disconnect listener, other requests — would run until this stream ended.
                await asyncio.sleep(0)
                for d in deltas:
                    if ttft is None and d.token_ids:
                        ttft = time.perf_counter() - t0
                    n_out += len(d.token_ids)
                    texts[d.index] += d.text
                    v = rails[d.index].feed(d.text, final=d.finish_reason is not None)
                    if v.blocked:
                        status, done = 400, True
                        srv.metrics.guard_blocks.labels(f"output:{v.blocked}").inc()
                        audit["guard"] += v.decisions
                        err = APIError(400, f"the response was stopped by the output guard ({v.blocked})",
                                       code=f"output_{v.blocked}")
                        yield sse(err.body(), event="error")
                        yield "data: [DONE]\n\n"
                        return
                    if v.text or d.logprobs:
                        yield chunk(d.index, v.text, lp=d.logprobs)
                    if d.finish_reason:
                        yield chunk(d.index, finish=d.finish_reason)
            if include_usage:
                yield sse({"id": rid, "object": obj, "created": created, "model": req.model, "choices": [],
                            "usage": usage(len(prompt_ids), n_out)})
            done = True
            yield "data: [DONE]\n\n"
        except EngineUnavailable as exc:
            status, done = 503, True
            yield sse(APIError(503, f"the model engine is unavailable ({exc})", code="engine_unavailable").body(),
                       event="error")
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # closing `gen` below aborts the engine request
                status = 499
                srv.metrics.aborted.inc()
                audit["guard"].append("client_disconnected")
            # Shielded: after a disconnect the task is cancelled, and an unshielded await here would be cancelled too,
            # leaving the engine request running and the slot taken.
            with anyio.CancelScope(shield=True):
                await gen.aclose()
                await slot.__aexit__(None, None, None)
            for r in rails:
                audit["guard"] += sorted(r.decisions - set(audit["guard"]))
            _finish_metrics(srv, route, n_out, ttft)
            audit.update(status=status, completion_tokens=n_out, latency_s=round(time.perf_counter() - t0, 4),
                         ttft_s=round(ttft, 4) if ttft else None, stream=True)
            srv.audit.write(audit, prompt=prompt_text, completion=texts)


def _finish_metrics(srv: Server, route: str, n_out: int, ttft: float | None) -> None:
    srv.metrics.tokens.labels("completion").inc(n_out)
    if ttft is not None:
        srv.metrics.ttft.labels(route).observe(ttft)
