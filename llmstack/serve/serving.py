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
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from llmstack import tools
from llmstack.config.serve import GuardPolicy, KeyEntry, Route, ServeSpec
from llmstack.serve.audit import AuditLog
from llmstack.serve.engines import EngineRejected, EngineUnavailable, GenParams
from llmstack.pii import find_pii
from llmstack.serve.guard import KeyRing, RateLimiter, StoreUnavailable, StreamRail, check_text
from llmstack.serve.metrics import ServeMetrics
from llmstack.serve.protocol import (APIError, ChatRequest, CompletionRequest, chat_logprobs, completion_logprobs,
                                     parse_body, sse, usage, validation_message)
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
    in_flight_by_key: dict = field(default_factory=dict)  # key id -> requests in flight (this replica)
    # Parsing, rails, chat templates and tokenizing run in worker threads, at most this many at once, so the event
    # loop only moves bytes: a flood of large bodies queues here instead of stalling every other client.
    workers: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(4))
    # One tokenizer call at a time: a fast tokenizer's settings (split_special_tokens, truncation) are shared state
    # that a call may change, and two worker threads must not see each other's.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    # LoRA adapters loaded at runtime (`llmstack adapters load`): kept in the routes store so every replica serves
    # the same ones; this replica's share of that (see sync_adapters)
    runtime_adapters: set = field(default_factory=set)  # names this replica loaded at runtime (not from server.yaml)
    adapter_errors: dict = field(default_factory=dict)  # name -> (folder, why, when) this replica could not load it
    adapter_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one adapter change at a time per replica

    shadow_budget: KeyEntry = field(init=False)

    def __post_init__(self):
        self.slots = asyncio.Semaphore(self.spec.max_concurrency)
        self._max_prompt_chars: int | None = None
        # shadow copies are the operator's traffic: charged to a budget of their own, never to the client's key
        self.shadow_budget = KeyEntry(id="shadow-budget", sha256="0" * 64,
                                      tokens_per_minute=self.policy.rate_limits.shadow_tokens_per_minute)

    def max_prompt_chars(self) -> int:
        """The longest prompt text that could still fit the context: no token is longer than the longest entry of
        the vocabulary (in a byte-level vocabulary every character stands for one byte, so a token's text has at
        most that many characters). A longer text is refused before the tokenizer spends seconds on it."""
        if self._max_prompt_chars is None:
            longest = max(len(t) for t in self.engine.tokenizer.get_vocab())
            self._max_prompt_chars = self.engine.max_model_len * longest
        return self._max_prompt_chars

    async def in_worker(self, fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.workers)

    def take_key_slot(self, key: KeyEntry) -> None:
        """One of the key's concurrent places (rate_limits.max_concurrent, or the key's own): a key cannot hold
        every engine slot with requests or streams it never finishes reading."""
        cap = key.max_concurrent or self.policy.rate_limits.max_concurrent
        held = self.in_flight_by_key.get(key.id, 0)
        if held >= cap:
            self.metrics.guard_blocks.labels("rate_limit:concurrent").inc()
            raise APIError(429, f"key '{key.id}' already has {held} requests in flight (the limit is {cap}); "
                           "finish reading them or retry shortly", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        self.in_flight_by_key[key.id] = held + 1

    def release_key_slot(self, key: KeyEntry) -> None:
        left = self.in_flight_by_key.get(key.id, 1) - 1
        if left > 0:
            self.in_flight_by_key[key.id] = left
        else:
            self.in_flight_by_key.pop(key.id, None)

    ADAPTER_RETRY_S = 30.0  # a folder that failed to load is tried again after this long (a volume mounted late)

    async def sync_adapters(self, max_age: float | None = None, since: float | None = None) -> None:
        """Make this replica serve the runtime adapters the routes store lists (read at most `max_age` s ago;
        default: the router's refresh): load those missing here, unload those this replica loaded at runtime that the
        store no longer lists (another replica's `adapters unload`). Adapters from server.yaml are never touched. A
        folder this replica cannot load is logged, counted (llmstack_adapter_load_failures_total) and remembered:
        requests for that name get a 503 here, and the load is tried again after ADAPTER_RETRY_S. `since` (a
        time.monotonic()): read the store unless a read began after it — many requests waiting here share one read."""
        if not hasattr(self.engine, "load_adapter"):
            return
        async with self.adapter_lock:
            await self.sync_adapters_locked(max_age if since is None else time.monotonic() - since)

    async def sync_adapters_locked(self, max_age: float | None = None) -> None:  # holding adapter_lock
        wanted = await asyncio.to_thread(self.router.adapters, max_age)  # a store read: off the event loop
        loaded = self.engine.adapters
        for name in [n for n in self.runtime_adapters if n not in wanted or loaded.get(n) != wanted[n]]:
            if name in loaded:
                await self.engine.unload_adapter(name)
            self.runtime_adapters.discard(name)
            log.info("adapter %s unloaded: no longer in the routes store", name)
        for name, path in wanted.items():
            if name in loaded:
                continue  # loaded now, or a server.yaml adapter of that name (which wins here)
            failed = self.adapter_errors.get(name)
            if failed and failed[0] == path and time.monotonic() - failed[2] < self.ADAPTER_RETRY_S:
                continue
            try:
                await self.engine.load_adapter(name, path)
            except (EngineRejected, EngineUnavailable) as exc:
                self.adapter_errors[name] = (path, str(exc)[:300], time.monotonic())
                self.metrics.adapter_load_failures.labels(name).inc()
                log.warning("adapter %s from the routes store could not be loaded here: %s", name, exc)
                continue
            self.runtime_adapters.add(name)
            self.adapter_errors.pop(name, None)
            log.info("adapter %s loaded from %s (the routes store lists it)", name, path)
        for name in [n for n in self.adapter_errors if n not in wanted]:
            del self.adapter_errors[name]

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


def _store_down(exc: StoreUnavailable) -> APIError:
    return APIError(503, f"{exc}; the server refuses requests it cannot count (rate_limits.on_store_error: deny). "
                    "Retry shortly", code="rate_limit_store_unavailable", headers={"Retry-After": "5"})


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def read_json(request: Request, srv: Server, schema: type[BaseModel]):
    caps = srv.policy.caps
    chunks, size = [], 0
    try:
        with anyio.fail_after(caps.body_timeout_s):  # a body trickled in byte by byte (slowloris) does not hold on
            async for chunk in request.stream():  # chunked bodies have no Content-Length: count while reading
                chunks.append(chunk)
                size += len(chunk)
                if size > caps.max_body_bytes:
                    srv.metrics.guard_blocks.labels("body_too_large").inc()
                    raise APIError(413, f"request body is over the {caps.max_body_bytes}-byte limit",
                                   code="request_too_large")
    except TimeoutError:
        srv.metrics.guard_blocks.labels("body_timeout").inc()
        raise APIError(408, f"the request body did not arrive within {caps.body_timeout_s:.0f} s",
                       code="request_timeout") from None
    return await srv.in_worker(_validated, b"".join(chunks), schema, caps.max_json_depth)


def _validated(body: bytes, schema: type[BaseModel], max_depth: int):
    raw = parse_body(body, max_depth)
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        msg, param = validation_message(exc)
        raise APIError(400, msg, param=param) from None


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
    return ToolPlan(tools=specs, mode=mode, name=name, parallel=req.parallel_tool_calls)


def check_history(req) -> None:
    """Calls and results in the conversation are OpenAI's shape: calls only on assistant turns, with arguments that
    are a JSON object; every tool turn answers a call made before it (`tool_call_id`)."""
    ids: set[str] = set()
    for i, m in enumerate(req.messages):
        if m.function_call is not None:
            raise APIError(400, "`function_call` in a message is OpenAI's deprecated form: send `tool_calls`",
                           param=f"messages[{i}].function_call", code="unsupported_parameter")
        for j, call in enumerate(m.tool_calls or []):
            if m.role != "assistant":
                raise APIError(400, "only assistant messages carry `tool_calls`", param=f"messages[{i}].tool_calls")
            try:
                tools.arguments_object(call.function.arguments)
            except tools.ToolCallError as exc:
                raise APIError(400, f"tool call arguments: {exc}",
                               param=f"messages[{i}].tool_calls[{j}].function.arguments") from None
            if call.id:
                ids.add(call.id)
        if m.role == "tool":
            if not m.tool_call_id:
                raise APIError(400, "a tool message needs `tool_call_id`: the id of the call it answers",
                               param=f"messages[{i}].tool_call_id")
            if m.tool_call_id not in ids:
                raise APIError(400, f"messages[{i}] answers tool call '{m.tool_call_id[:64]}', which no earlier "
                               "assistant message made", param=f"messages[{i}].tool_call_id")


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
    if any(len(s) > caps.max_stop_chars for s in stops):
        raise APIError(400, f"a stop sequence may have at most {caps.max_stop_chars} characters", param="stop")
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
    """Limits before work: the request is counted against its key's budget and concurrency before its body is read,
    so refused requests cost their sender too; then parse, checks, rails and tokens (in worker threads), then the
    token budget, then the engine."""
    t0 = time.perf_counter()
    key: KeyEntry = request.state.key
    route = "/v1/chat/completions" if chat else "/v1/completions"
    rid = new_request_id("chatcmpl" if chat else "cmpl")
    audit = {"request_id": rid, "key_id": key.id, "route": route, "guard": []}
    holding = False  # this request holds one of its key's concurrent places (released when it ends)
    handed_over = False  # a stream took over the key place and the engine slot: it releases them itself
    try:
        try:
            retry = await srv.limiter.admit_request(key)
        except StoreUnavailable as exc:
            raise _store_down(exc) from None
        if retry is not None:
            srv.metrics.guard_blocks.labels("rate_limit:requests_per_minute").inc()
            audit["guard"].append("rate_limit:requests_per_minute")
            raise APIError(429, f"rate limit reached for key '{key.id}' (requests_per_minute); retry in "
                           f"{retry:.0f} s", code="rate_limit_exceeded", headers={"Retry-After": str(int(retry + 0.999))})
        srv.take_key_slot(key)
        holding = True
        req = await read_json(request, srv, ChatRequest if chat else CompletionRequest)
        audit["model"] = req.model[:200]
        plan = None
        if chat:  # schemas are checked in a worker thread: a request may carry many
            plan = await srv.in_worker(plan_tools, req, srv.policy.caps)
            check_history(req)
        served = srv.public_names()
        if req.model not in served:
            await srv.sync_adapters(since=time.monotonic())  # loaded on another replica a moment ago?
            served = srv.public_names()
        if req.model not in served and req.model in srv.adapter_errors and KeyRing.allows(key, req.model):
            raise APIError(503, f"adapter '{req.model}' is loaded on other replicas but could not be loaded on this "
                           f"one ({srv.adapter_errors[req.model][1]}); retry shortly", param="model",
                           code="adapter_unavailable", headers={"Retry-After": "30"})
        if req.model not in served:
            mine = [m for m in served if KeyRing.allows(key, m)]
            raise APIError(404, f"model '{req.model[:200]}' does not exist or is not available to this key; this key "
                           f"may use: {', '.join(mine) or 'no model'}", param="model", code="model_not_found")
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
        if plan is not None and plan.forced:
            schema = plan.schema()
        elif chat and req.response_format is not None and req.response_format.type != "text":
            if req.response_format.type == "json_schema":
                if req.response_format.json_schema is None:
                    raise APIError(400, "response_format.json_schema is required for type json_schema",
                                   param="response_format")
                schema = req.response_format.json_schema.schema_
                await srv.in_worker(check_json_schema, schema, "response_format", srv.policy.caps.max_tool_schema_bytes)
            else:
                json_object = True
        params = gen_params(req, chat, srv.policy.caps, schema, json_object)

        # ---- input rails, then the prompt tokens the engine will see (off the event loop)
        prompt_ids, prompt_text = await srv.in_worker(render, req, chat, srv, audit, plan)
        n_prompt = len(prompt_ids)
        context = srv.engine.max_model_len
        if n_prompt + params.max_tokens > context:
            raise APIError(400, f"this model's context is {context} tokens; the prompt has {n_prompt} "
                           f"and max_tokens asks for {params.max_tokens} more. Shorten the prompt or lower max_tokens.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")

        # ---- the token budget: prompt + worst-case completion, reserved up front
        cost = n_prompt + params.max_tokens * params.n
        budget = srv.limiter.never_fits(key, cost)
        if budget is not None:
            raise APIError(400, f"this request needs up to {cost} tokens (prompt {n_prompt} + max_tokens "
                           f"{params.max_tokens} x n {params.n}) and key '{key.id}' may use {budget} a minute: it "
                           "can never be admitted; shorten it or lower max_tokens", code="tokens_exceed_limit")
        try:
            retry = await srv.limiter.admit_tokens(key, cost)
        except StoreUnavailable as exc:
            raise _store_down(exc) from None
        if retry is not None:
            srv.metrics.guard_blocks.labels("rate_limit:tokens_per_minute").inc()
            audit["guard"].append("rate_limit:tokens_per_minute")
            raise APIError(429, f"rate limit reached for key '{key.id}' (tokens_per_minute); retry in {retry:.0f} s",
                           code="rate_limit_exceeded", headers={"Retry-After": str(int(retry + 0.999))})

        srv.metrics.tokens.labels("prompt").inc(n_prompt)
        audit["prompt_tokens"] = n_prompt
        await srv.in_worker(srv.traffic.observe, user_text(req, chat))  # the traffic served, for drift
        call = Call(srv=srv, rid=rid, req=req, params=params, prompt_ids=prompt_ids, prompt_text=prompt_text,
                    chat=chat, route=route, audit=audit, t0=t0, key=key,
                    plan=plan if plan is not None and plan.mode != "none" else None)
        if call.plan is not None:
            audit["tools_offered"] = len(plan.tools)
            audit["tool_choice"] = plan.mode
        if shadow:
            call.shadow = await start_shadow(srv, shadow, public, rid, prompt_ids, params)
        if req.stream:
            slot = srv.slot()
            await slot.__aenter__()  # refuse (503) before the 200 of the stream goes out
            call.slot = slot
            handed_over = True
            return ClosingStreamingResponse(call.stream(), call.release, media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        handed_over = True  # complete() releases in its own finally
        return await call.complete(request)
    except APIError as exc:
        if "status" not in audit:
            audit.update(status=exc.status, error=exc.code or exc.message[:200],
                         latency_s=round(time.perf_counter() - t0, 4))
            srv.audit.write(audit)
        raise
    finally:
        if holding and not handed_over:
            srv.release_key_slot(key)


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
    """Closes the body generator when the response ends, however it ends, then calls `on_close` (idempotent: frees
    the engine slot and the key's place). After a client disconnect Starlette only cancels the sending task: a
    generator paused at a `yield` would otherwise wait for the garbage collector (its frames sit in a traceback cycle)
    before its `finally` aborts the engine request and frees the slot."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                # a generator closed before its first step never runs its own `finally`: release here too
                await self.on_close()


def too_long(srv: Server, text: str, param: str) -> None:
    if len(text) > srv.max_prompt_chars():
        raise APIError(400, f"this model's context is {srv.engine.max_model_len} tokens, and a prompt of "
                       f"{len(text)} characters cannot fit in it; shorten it", param=param,
                       code="context_length_exceeded")


def _guard_leaves(value, guard, param: str):
    """Every string in a JSON value through the input rails (redacted in place, or the request refused)."""
    if isinstance(value, str):
        return guard(value, param)
    if isinstance(value, dict):
        return {k: _guard_leaves(v, guard, param) for k, v in value.items()}
    if isinstance(value, list):
        return [_guard_leaves(v, guard, param) for v in value]
    return value


def _specials(tok) -> list[str]:
    return [t for t in tok.all_special_tokens if t] + [t.content for t in tok.added_tokens_decoder.values()
                                                       if t.special]


def render(req, chat: bool, srv: Server, audit: dict, plan: ToolPlan | None = None) -> tuple[list[int], str]:
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
        messages, tooled = [], plan is not None and plan.mode != "none"
        for i, m in enumerate(req.messages):
            text = m.text()
            railed = m.role not in rails.exempt_roles  # every role's text is checked unless the policy exempts it
            if railed:
                text = guard(text, f"messages[{i}].content")
            msg = {"role": "system" if m.role == "developer" else m.role, "content": text}
            if m.tool_calls:  # the arguments a model sent earlier are text like any other: railed leaf by leaf
                msg["tool_calls"] = [{"type": "function", "function": {
                    "name": c.function.name,
                    "arguments": _guard_leaves(tools.arguments_object(c.function.arguments), guard,
                                               f"messages[{i}].tool_calls[{j}].function.arguments")
                    if railed else tools.arguments_object(c.function.arguments)}}
                    for j, c in enumerate(m.tool_calls)]
                tooled = True
            if m.role == "tool":
                msg["tool_call_id"] = m.tool_call_id
                tooled = True
            messages.append(msg)
        specs = plan.tools if plan is not None and plan.mode != "none" else None
        extra = json.dumps([specs, [m.get("tool_calls") for m in messages]], ensure_ascii=False) if tooled else ""
        too_long(srv, "".join(m["content"] for m in messages) + extra, "messages")
        with srv.tokenizer_lock:
            if tooled and any(sp in extra for sp in _specials(tok)):
                raise APIError(400, "a tool spec or tool call spells a special token of this model; remove it",
                               param="tools", code="special_token_in_content")
            return encode_chat(tok, messages, specs, tools.template_for(tok) if tooled else None)
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
        with srv.tokenizer_lock:
            text = tok.decode(prompt)
        checked = guard(text, "prompt")
        if checked == text:
            return prompt, checked
        with srv.tokenizer_lock:
            return tok(checked)["input_ids"], checked
    too_long(srv, prompt, "prompt")
    prompt = guard(prompt, "prompt")
    with srv.tokenizer_lock:
        return tok(prompt)["input_ids"], prompt


_MARK = "\ue000{}\ue001"  # private-use characters around a message index: stand-ins for content while rendering


def encode_chat(tok, messages: list[dict], tool_specs: list[dict] | None = None,
                template: str | None = None) -> tuple[list[int], str]:
    """The prompt tokens of a chat, with the message contents tokenized as text: a `<|im_end|><|im_start|>system`
    typed into a message stays those characters, never the control tokens that would forge a turn.

    Ordinary content goes the way vLLM's own server goes (render to text, tokenize without extra specials), so the
    prompt tokens are the same as there. Content that spells a special token is rendered with a stand-in, and the
    template's own text around it is tokenized as usual while the content is tokenized with special tokens split."""
    def apply(msgs):
        return tok.apply_chat_template(msgs, tools=tool_specs, chat_template=template, add_generation_prompt=True,
                                       tokenize=False)

    prompt_text = apply(messages)
    specials = _specials(tok)
    forged = [i for i, m in enumerate(messages) if any(sp in m["content"] for sp in specials)]
    if not forged:
        return tok(prompt_text, add_special_tokens=False)["input_ids"], prompt_text
    stand_in = [{**m, "content": _MARK.format(i) if i in forged else m["content"]} for i, m in enumerate(messages)]
    rendered = apply(stand_in)
    ids, rest = [], rendered
    for i in forged:
        mark = _MARK.format(i)
        if rest.count(mark) != 1:
            raise APIError(400, f"messages[{i}].content spells a special token of this model, and its chat template "
                           "does not keep message text apart; remove the special token", param=f"messages[{i}]",
                           code="special_token_in_content")
        before, rest = rest.split(mark)
        ids += tok(before, add_special_tokens=False)["input_ids"]
        ids += tok(messages[i]["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ids += tok(rest, add_special_tokens=False)["input_ids"]
    return ids, prompt_text


async def start_shadow(srv: Server, model: str, public: str, rid: str, prompt_ids: list[int],
                       params: GenParams) -> asyncio.Task | None:
    """The shadow copy of a request, charged to the operator's shadow budget (rate_limits.shadow_tokens_per_minute):
    a flood of live requests cannot double the engine's load through their shadows. None when the budget is spent."""
    cost = len(prompt_ids) + params.max_tokens * params.n
    try:
        over = await srv.limiter.admit_tokens(srv.shadow_budget, cost) is not None
    except StoreUnavailable:
        over = True  # `deny`: no budget can be checked, so no shadow
    if over:
        srv.metrics.guard_blocks.labels("shadow_budget").inc()
        return None
    task = asyncio.create_task(run_shadow(srv, model, public, rid, prompt_ids, params))
    srv.background.add(task)
    task.add_done_callback(srv.background.discard)
    return task


@dataclass
class Call:
    """One generation request that passed every check: what the engine is asked, the audit line it fills in, and what
    it holds until it ends (an engine slot, one of its key's concurrent places, its shadow copy)."""

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
    key: KeyEntry
    slot: Any = None  # the engine slot a stream holds (Server.slot(), entered)
    shadow: asyncio.Task | None = None
    released: bool = False
    plan: ToolPlan | None = None  # tools offered to the model (auto / required / named)

    def read_calls(self, text: str) -> tuple[str | None, list[dict]]:
        """Content and calls (OpenAI's wire shape) of one finished answer. A forced call is the constrained JSON
        itself; otherwise the engine's parser reads Hermes blocks (vLLM's own parser on the vllm engine). An answer
        whose calls do not parse, or name a function that was not offered, stays text: a client is never handed a
        call it did not declare."""
        plan = self.plan
        if plan.forced:
            calls = tools.parse_forced(text, plan.many)
            content = None
        else:
            parse = getattr(self.srv.engine, "parse_tool_calls", None) or tools.parse_calls
            content, calls = parse(text)
        if not calls or any(c["name"] not in plan.names() for c in calls):
            return text, []
        if not plan.parallel:
            calls = calls[:1]
        self.audit.setdefault("tool_calls", []).extend(c["name"] for c in calls)  # names only, never arguments
        return content, [wire_call(c) for c in calls]

    async def release(self, aborted: bool = False) -> None:
        """Free what the request holds, once. An aborted request (client gone, engine error) takes its shadow with
        it: nobody will compare that answer."""
        if self.released:
            return
        self.released = True
        if self.slot is not None:
            await self.slot.__aexit__(None, None, None)
        self.srv.release_key_slot(self.key)
        if aborted and self.shadow is not None and not self.shadow.done():
            self.shadow.cancel()

    async def complete(self, request: Request):
        """The whole answer as one JSON body; a client that hangs up first aborts the engine request."""
        srv, req, params, chat, audit, t0 = self.srv, self.req, self.params, self.chat, self.audit, self.t0
        texts = [""] * params.n
        lps: list[list[tuple[int, int, dict]]] = [[] for _ in range(params.n)]  # (raw start, raw end, row)
        prompt_lps: list[dict | None] = []
        finish: list[str | None] = [None] * params.n
        n_out, ttft, status = 0, None, 200

        async def run():
            nonlocal n_out, ttft
            async for deltas in srv.engine.generate(self.rid, self.prompt_ids, params, req.model):
                for d in deltas:
                    if ttft is None and d.token_ids:
                        ttft = time.perf_counter() - t0
                    start = len(texts[d.index])
                    texts[d.index] += d.text
                    n_out += len(d.token_ids)
                    lps[d.index] += [(start, len(texts[d.index]), row) for row in d.logprobs or []]
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
        except Exception as exc:  # noqa: BLE001 - an engine failure is this request's 500, never a dropped connection
            status = 500
            log.exception("engine failed on %s", self.rid)
            raise APIError(500, f"the model engine failed on this request ({type(exc).__name__})",
                           code="engine_error") from None
        finally:
            if status != 200:
                if "arm" in audit:
                    srv.metrics.version_errors.labels(req.model, audit["arm"]).inc()
                audit.update(status=status, latency_s=round(time.perf_counter() - t0, 4), completion_tokens=n_out)
                srv.audit.write(audit, prompt=self.prompt_text)
            await self.release(aborted=status != 200)

        echo = not chat and req.echo
        if echo and req.max_tokens == 0:  # scoring only: drop the one step the engine had to take
            texts, lps, finish, n_out = [""] * params.n, [[] for _ in range(params.n)], ["length"] * params.n, 0
        if echo and params.logprobs is not None and len(prompt_lps) != len(self.prompt_ids):
            raise APIError(500, f"the engine returned {len(prompt_lps)} prompt logprobs for {len(self.prompt_ids)} "
                           "prompt tokens", code="internal_error")  # never hand out misaligned scores
        choices, sent = [], []
        for i in range(params.n):
            v = check_text(texts[i], srv.policy.output)
            audit["guard"] += v.decisions
            reason = finish[i] or "length"
            redacted = [(sp.start, sp.end) for sp in find_pii(texts[i])] if v.text != texts[i] else []
            text, rows = v.text, scrub_rows(lps[i], redacted, srv.policy.output)
            if v.blocked:  # the output rail withholds this choice (as OpenAI/Azure content filters do), logprobs too
                srv.metrics.guard_blocks.labels(f"output:{v.blocked}").inc()
                text, rows, reason = "", [], "content_filter"
            sent.append(text)
            if chat:
                message = {"role": "assistant", "content": text}
                if self.plan is not None and not v.blocked:
                    message["content"], calls = self.read_calls(text)
                    if calls:
                        message["tool_calls"], reason = calls, "tool_calls"
                choice = {"index": i, "message": message, "finish_reason": reason,
                          "logprobs": chat_logprobs(rows) if params.logprobs is not None else None}
            else:
                if echo:  # the prompt (as the input guard passed it) before the completion, its logprobs before theirs
                    text = self.prompt_text + text
                    rows = [*prompt_lps, *rows]
                first = srv.engine.tokenizer.decode(self.prompt_ids[:1]) if echo else ""
                choice = {"index": i, "text": text, "finish_reason": reason,
                          "logprobs": completion_logprobs(rows, first) if params.logprobs is not None else None}
            choices.append(choice)
        _finish_metrics(srv, self.route, n_out, ttft)
        if "arm" in audit:
            srv.metrics.version_latency.labels(req.model, audit["arm"]).observe(time.perf_counter() - t0)
        audit.update(status=200, completion_tokens=n_out, latency_s=round(time.perf_counter() - t0, 4),
                     ttft_s=round(ttft, 4) if ttft else None, finish=[c["finish_reason"] for c in choices])
        srv.audit.write(audit, prompt=self.prompt_text, completion=sent)  # what the client got: after the rails
        return {"id": self.rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": req.model, "choices": choices,
                "usage": usage(len(self.prompt_ids), n_out)}

    async def stream(self):
        """Server-sent events, each delta through the output rails; the slot is held until the stream ends. Logprobs
        rows go out with their text, once the rail has released it (redacted alike), never ahead of it."""
        srv, rid, req, params, chat, audit, t0 = self.srv, self.rid, self.req, self.params, self.chat, self.audit, self.t0
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        rails = [StreamRail(srv.policy.output, srv.policy.output.holdback_chars) for _ in range(params.n)]
        raw_len = [0] * params.n
        held_rows: list[list[tuple[int, int, dict]]] = [[] for _ in range(params.n)]
        sent = [""] * params.n
        n_out, ttft, status = 0, None, 200
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index: int, text: str | None = None, finish: str | None = None, lp: list[dict] | None = None,
                  role: bool = False, calls: list[dict] | None = None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                if calls:
                    delta["tool_calls"] = calls
                choice = {"index": index, "delta": delta, "finish_reason": finish,
                          "logprobs": chat_logprobs(lp) if lp else None}
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish,
                          "logprobs": completion_logprobs(lp) if lp else None}
            body = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return sse(body)

        splitters = [tools.CallSplitter() for _ in range(params.n)]
        forced_text = [""] * params.n
        calls_out = [0] * params.n
        rows_due: list[list[dict]] = [[] for _ in range(params.n)]

        def tool_chunks(i: int, text: str, rows: list[dict], finish: str | None):
            """A choice's railed text as OpenAI streams tool calls: content deltas as they come (a possible
            `<tool_call>` tag held back), then each call once its block is complete — a delta with its index, id and
            name, then one with its arguments — and finish_reason `tool_calls`. A forced call goes out at the end.
            Logprobs rows ride on the next delta that goes out."""
            plan = self.plan
            rows_due[i] += rows
            final = finish is not None
            if plan.forced:
                forced_text[i] += text
                events = []
                if final:
                    calls = tools.parse_forced(forced_text[i], plan.many)
                    events = [("call", c) for c in calls] if calls else [("content", forced_text[i])]
            else:
                events = splitters[i].feed(text, final=final)
            for kind, value in events:
                if kind == "call" and value["name"] not in plan.names():  # never hand out an undeclared call
                    kind, value = "content", f"<tool_call>\n{json.dumps(value, ensure_ascii=False)}\n</tool_call>"
                if kind == "call" and calls_out[i] and not plan.parallel:
                    continue  # parallel_tool_calls false: the first call only
                lp, rows_due[i] = rows_due[i], []
                if kind == "content":
                    yield chunk(i, value, lp=lp)
                    continue
                wc = wire_call(value)
                audit.setdefault("tool_calls", []).append(value["name"])
                yield chunk(i, lp=lp, calls=[{"index": calls_out[i], "id": wc["id"], "type": "function",
                                              "function": {"name": value["name"], "arguments": ""}}])
                yield chunk(i, calls=[{"index": calls_out[i], "function": {"arguments": wc["function"]["arguments"]}}])
                calls_out[i] += 1
            if final:
                lp, rows_due[i] = rows_due[i], []
                yield chunk(i, finish="tool_calls" if calls_out[i] else finish, lp=lp)

        def error_event(status_code: int, message: str, code: str) -> list[str]:
            return [sse(APIError(status_code, message, code=code).body(), event="error"), "data: [DONE]\n\n"]

        gen = srv.engine.generate(rid, self.prompt_ids, params, req.model)
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
                    i, start = d.index, raw_len[d.index]
                    raw_len[i] += len(d.text)
                    held_rows[i] += [(start, raw_len[i], row) for row in d.logprobs or []]
                    rail = rails[i]
                    v = rail.feed(d.text, final=d.finish_reason is not None)
                    if v.blocked:
                        status, done = 400, True
                        srv.metrics.guard_blocks.labels(f"output:{v.blocked}").inc()
                        audit["guard"] += v.decisions
                        for line in error_event(400, f"the response was stopped by the output guard ({v.blocked})",
                                                f"output_{v.blocked}"):
                            yield line
                        return
                    ready = [r for r in held_rows[i] if r[1] <= rail.consumed]
                    held_rows[i] = held_rows[i][len(ready):]
                    rows = scrub_rows(ready, rail.redacted, srv.policy.output)
                    sent[i] += v.text
                    if self.plan is not None:
                        for line in tool_chunks(i, v.text, rows, d.finish_reason):
                            yield line
                        continue
                    if v.text or rows:
                        yield chunk(i, v.text, lp=rows)
                    if d.finish_reason:
                        yield chunk(i, finish=d.finish_reason)
            if include_usage:
                yield sse({"id": rid, "object": obj, "created": created, "model": req.model, "choices": [],
                           "usage": usage(len(self.prompt_ids), n_out)})
            done = True
            yield "data: [DONE]\n\n"
        except EngineUnavailable as exc:
            status, done = 503, True
            for line in error_event(503, f"the model engine is unavailable ({exc})", "engine_unavailable"):
                yield line
        except EngineRejected as exc:  # e.g. a schema the structured-output backend cannot compile
            status, done = 400, True
            for line in error_event(400, str(exc), "invalid_request"):
                yield line
        except Exception as exc:  # noqa: BLE001 - after the 200 went out, an engine failure is an error event
            status, done = 500, True
            log.exception("engine failed while streaming %s", rid)
            for line in error_event(500, f"the model engine failed on this request ({type(exc).__name__})",
                                    "engine_error"):
                yield line
        finally:
            if not done:  # closing `gen` below aborts the engine request
                status = 499
                srv.metrics.aborted.inc()
                audit["guard"].append("client_disconnected")
            # Shielded: after a disconnect the task is cancelled, and an unshielded await here would be cancelled too,
            # leaving the engine request running and the slot taken.
            with anyio.CancelScope(shield=True):
                await gen.aclose()
                await self.release(aborted=status != 200)
            for r in rails:
                audit["guard"] += sorted(r.decisions - set(audit["guard"]))
            _finish_metrics(srv, self.route, n_out, ttft)
            audit.update(status=status, completion_tokens=n_out, latency_s=round(time.perf_counter() - t0, 4),
                         ttft_s=round(ttft, 4) if ttft else None, stream=True)
            srv.audit.write(audit, prompt=self.prompt_text, completion=sent)


def wire_call(call: dict) -> dict:
    return {"id": tools.new_call_id(), "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def scrub_rows(rows: list[tuple[int, int, dict]], redacted: list[tuple[int, int]], rails) -> list[dict]:
    """Logprobs rows as the output rails would let them out. A row whose text lies in a span the rails redacted
    carries no token text (the logprob stays: it says how sure the model was, not what it said); a top alternative
    that is itself PII or a blocked term is dropped. `rows` are (raw start, raw end, row) of the answer's text."""
    out = []
    for start, end, row in rows:
        hidden = any(s < end and start < e for s, e in redacted)
        top = [t for t in row.get("top", []) if not _leaks(t["token"], rails)]
        if hidden:
            out.append({**row, "token": "", "top": []})
        else:
            out.append({**row, "top": top})
    return out


def _leaks(token: str, rails) -> bool:
    if rails.pii != "off" and find_pii(token):
        return True
    low = token.lower()
    return any(term.lower() in low for term in rails.blocklist)


def _finish_metrics(srv: Server, route: str, n_out: int, ttft: float | None) -> None:
    srv.metrics.tokens.labels("completion").inc(n_out)
    if ttft is not None:
        srv.metrics.ttft.labels(route).observe(ttft)
