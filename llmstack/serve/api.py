"""The guarded OpenAI-compatible API (FastAPI) in front of an engine from engine.py.

Request path: key gate (401, 413 by Content-Length) -> parse (400) -> model allowlist (404/403) -> caps (400)
-> input rails (400 / redact) -> chat template + context check (400) -> rate limits (429) -> engine slot
(bounded queue: 503) -> generate (SSE or JSON) with output rails -> audit line + metrics.

Routes: GET /health (no key), /ready, /metrics, /docs, /openapi.json, /v1/models; POST /v1/chat/completions,
/v1/completions. Every error body is OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmstack.serve.audit import AuditLog
from llmstack.serve.config import GuardPolicy, KeyEntry, KeyFile, ServeSpec
from llmstack.serve.engine import EngineRejected, EngineUnavailable, GenParams
from llmstack.serve.guard import KeyRing, RateLimiter, StreamRail, check_text, presented_key
from llmstack.serve.metrics import ServeMetrics
from llmstack.monitor import TrafficProfile, compare, load_profile
from llmstack.serve.routing import Route, Router

log = logging.getLogger("llmstack.serve")
PUBLIC_PATHS = {"/health"}


# ------------------------------------------------------------------------------------------- request schemas
class _Loose(BaseModel):
    # OpenAI clients send fields we do not use (user, metadata, ...): accept and ignore them.
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Loose):
    type: str
    text: str | None = None


class ChatMessage(_Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

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
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    # OpenAI's default for /v1/completions; 0 only with `echo` (score the prompt, generate nothing)
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False  # the prompt comes back before the completion, with its tokens' logprobs if `logprobs` is set


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


def _validation_message(exc: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p not in ("body",))
    return f"{loc}: {err['msg']}" if loc else err["msg"], loc or None


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


class KeyGate:
    """ASGI middleware: every path but /health needs a valid key (docs and metrics included); bodies past the cap by
    Content-Length get 413 before they are read. Also counts requests and latency per route for /metrics."""

    def __init__(self, app, server_ref: dict):
        self.app, self.ref = app, server_ref

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        srv: Server = self.ref["server"]
        path, t0, status = scope["path"], time.perf_counter(), {"code": 500}
        route = path if path in ROUTES else "other"

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                srv.metrics.requests.labels(route, str(status["code"])).inc()
                srv.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            await send(message)

        if path not in PUBLIC_PATHS:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            entry = srv.keyring.authenticate(presented_key(headers))
            if entry is None:
                srv.metrics.guard_blocks.labels("auth").inc()
                srv.audit.write({"request_id": _rid(), "key_id": None, "route": path, "status": 401,
                                 "guard": ["auth:missing" if not presented_key(headers) else "auth:invalid"]})
                err = APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send_wrapped)
            scope.setdefault("state", {})["key"] = entry
            length = headers.get("content-length")
            if length and length.isdigit() and int(length) > srv.policy.caps.max_body_bytes:
                srv.metrics.guard_blocks.labels("body_too_large").inc()
                err = APIError(413, f"request body is {length} bytes; the limit is {srv.policy.caps.max_body_bytes}",
                               code="request_too_large")
                return await err.response()(scope, receive, send_wrapped)
        await self.app(scope, receive, send_wrapped)


ROUTES = {"/health", "/ready", "/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/chat/completions",
          "/v1/completions", "/v1/monitor/profile"}


def _rid(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# ------------------------------------------------------------------------------------------------------- app
def build_app(engine, spec: ServeSpec, policy: GuardPolicy | None = None, keys: KeyFile | None = None,
              audit_path: str | None = None) -> FastAPI:
    """The app. The engine is started in the app's lifespan and shut down (after uvicorn drains) at its end."""
    policy = policy or GuardPolicy()
    ref: dict = {}
    _check_routes(spec.routes, engine.names)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ref["server"] = Server(engine=engine, spec=spec, policy=policy, keyring=KeyRing(keys or KeyFile(keys=[])),
                               limiter=RateLimiter(policy), metrics=ServeMetrics(),
                               audit=AuditLog(audit_path or spec.audit_log, policy.audit.log_prompts),
                               router=Router(spec.routes), traffic=TrafficProfile(),
                               drift_reference=load_profile(spec.drift_reference) if spec.drift_reference else None)
        if not engine.ready:
            await engine.start()
        log.info("serving %s with the %s engine", ", ".join(engine.names), engine.kind)
        yield
        await engine.shutdown()

    app = FastAPI(title="llmstack", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(KeyGate, server_ref=ref)
    app.state.ref = ref

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return APIError(400, msg, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()

    # ------------------------------------------------------------------------------------------- plain routes
    @app.get("/health")
    async def health():
        return {"status": "ok", "engine": engine.state}

    @app.get("/ready")
    async def ready():
        if not engine.ready:
            raise APIError(503, f"engine is {engine.state}", code="engine_unavailable", headers={"Retry-After": "5"})
        return {"status": "ready", "engine": engine.kind, "models": engine.names, "restarts": engine.restarts,
                "running": engine.running()}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        srv: Server = ref["server"]
        srv.metrics.engine_restarts.set(engine.restarts)
        if srv.drift_reference is not None and srv.traffic.n >= spec.drift_min_requests:
            for feature, f in compare(srv.drift_reference, srv.traffic)["features"].items():
                srv.metrics.drift_psi.labels(feature).set(f["psi"])
        return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi():
        return app.openapi()

    @app.get("/docs", include_in_schema=False)
    async def docs():
        from fastapi.openapi.docs import get_swagger_ui_html

        # The browser fetches /openapi.json itself, without the key, so the page embeds the spec instead.
        html = get_swagger_ui_html(openapi_url="/openapi.json", title="llmstack API").body.decode()
        html = html.replace("url: '/openapi.json'", f"spec: {json.dumps(app.openapi())}")
        return Response(html, media_type="text/html")

    @app.get("/v1/models")
    async def list_models(request: Request):
        key: KeyEntry = request.state.key
        now = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": now, "owned_by": "llmstack"}
                                           for name in ref["server"].public_names() if KeyRing.allows(key, name)]}

    @app.get("/v1/monitor/profile")
    async def traffic_profile():
        """Binned feature counts of the prompts served so far, for `llmstack monitor` (no text is kept)."""
        return ref["server"].traffic.to_json()

    # ------------------------------------------------------------------------ routing admin (canary, rollback)
    def _admin(request: Request) -> Router:
        if not request.state.key.admin:
            raise APIError(403, "this API key may not change routes (needs `admin: true` in the key file)",
                           code="admin_only")
        return ref["server"].router

    @app.get("/admin/routes")
    async def get_routes(request: Request):
        return _admin(request).snapshot()

    @app.put("/admin/routes/{name}")
    async def put_route(name: str, request: Request):
        router = _admin(request)
        try:
            route = Route.model_validate(await request.json())
        except (ValidationError, ValueError) as exc:
            raise APIError(400, f"not a valid route: {exc}", code="invalid_route") from None
        try:
            _check_routes({name: route}, engine.names)
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_route") from None
        router.set(name, route)
        log.info("route %s set to %s", name, route.model_dump(exclude_none=True))
        return router.snapshot()

    @app.post("/admin/routes/{name}/rollback")
    async def rollback_route(name: str, request: Request):
        router = _admin(request)
        try:
            router.rollback(name)
        except KeyError as exc:
            raise APIError(409, str(exc.args[0]), code="nothing_to_roll_back") from None
        log.info("route %s rolled back", name)
        return router.snapshot()

    # -------------------------------------------------------------------------------------------- generation
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, ref["server"], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, ref["server"], chat=False)

    return app


async def _read_json(request: Request, srv: Server, schema: type[BaseModel]):
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
        msg, param = _validation_message(exc)
        raise APIError(400, msg, param=param) from None


def _params(req, chat: bool, caps, spec_json: dict | None, json_object: bool) -> GenParams:
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


async def _generate(request: Request, srv: Server, chat: bool):
    t0 = time.perf_counter()
    key: KeyEntry = request.state.key
    route = "/v1/chat/completions" if chat else "/v1/completions"
    rid = _rid("chatcmpl" if chat else "cmpl")
    audit = {"request_id": rid, "key_id": key.id, "route": route, "guard": []}
    try:
        req = await _read_json(request, srv, ChatRequest if chat else CompletionRequest)
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
        params = _params(req, chat, srv.policy.caps, schema, json_object)

        # ---- input rails, then the prompt tokens the engine will see
        prompt_ids, prompt_text = _render(req, chat, srv, audit)
        await anyio.to_thread.run_sync(srv.traffic.observe, _user_text(req, chat))
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
    ctx = dict(rid=rid, req=req, params=params, prompt_ids=prompt_ids, prompt_text=prompt_text, chat=chat,
               route=route, audit=audit, t0=t0)
    if shadow:
        task = asyncio.create_task(_shadow(srv, shadow, public, rid, prompt_ids, params))
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
        return ClosingStreamingResponse(_stream(srv, slot, **ctx), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
    return await _complete(request, srv, **ctx)


def _user_text(req, chat: bool) -> str:
    """What the end user wrote (the last user turn, or the prompt): the text drift is measured on."""
    if chat:
        return next((m.text() for m in reversed(req.messages) if m.role == "user"), "")
    return req.prompt if isinstance(req.prompt, str) else ""


def _check_routes(routes: dict[str, Route], served: list[str]) -> None:
    for name, r in routes.items():
        missing = [m for m in (r.primary, r.canary.model if r.canary else None, r.shadow) if m and m not in served]
        if missing:
            raise ValueError(f"routes.{name}: {', '.join(missing)} is not served here (served: {', '.join(served)})")


async def _shadow(srv: Server, model: str, public: str, rid: str, prompt_ids: list[int], params: GenParams) -> None:
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


def _render(req, chat: bool, srv: Server, audit: dict) -> tuple[list[int], str]:
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


def _chat_logprobs(rows: list[dict]) -> dict:
    def item(r):
        return {"token": r["token"], "logprob": r["logprob"], "bytes": list(r["token"].encode())}

    return {"content": [{**item(r), "top_logprobs": [item(t) for t in r["top"]]} for r in rows]}


def _completion_logprobs(rows: list[dict | None], first_token: str = "") -> dict:
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


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _complete(request: Request, srv: Server, rid, req, params, prompt_ids, prompt_text, chat, route, audit,
                    t0):
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
                      "logprobs": _chat_logprobs(rows) if params.logprobs is not None else None}
        else:
            if echo:  # the prompt (as the input guard passed it) before the completion, its logprobs before theirs
                text = prompt_text + text
                rows = [*prompt_lps, *rows]
            first = srv.engine.tokenizer.decode(prompt_ids[:1]) if echo else ""
            choice = {"index": i, "text": text, "finish_reason": reason,
                      "logprobs": _completion_logprobs(rows, first) if params.logprobs is not None else None}
        choices.append(choice)
    _finish_metrics(srv, route, n_out, ttft)
    if "arm" in audit:
        srv.metrics.version_latency.labels(req.model, audit["arm"]).observe(time.perf_counter() - t0)
    audit.update(status=200, completion_tokens=n_out, latency_s=round(time.perf_counter() - t0, 4),
                 ttft_s=round(ttft, 4) if ttft else None, finish=[c["finish_reason"] for c in choices])
    srv.audit.write(audit, prompt=prompt_text, completion=texts)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": req.model, "choices": choices, "usage": _usage(len(prompt_ids), n_out)}


def _finish_metrics(srv: Server, route: str, n_out: int, ttft: float | None) -> None:
    srv.metrics.tokens.labels("completion").inc(n_out)
    if ttft is not None:
        srv.metrics.ttft.labels(route).observe(ttft)


def _sse(obj: dict, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(srv: Server, slot, rid, req, params, prompt_ids, prompt_text, chat, route, audit, t0):
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
                      "logprobs": _chat_logprobs(lp) if lp else None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish,
                      "logprobs": _completion_logprobs(lp) if lp else None}
        body = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return _sse(body)

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
                    yield _sse(err.body(), event="error")
                    yield "data: [DONE]\n\n"
                    return
                if v.text or d.logprobs:
                    yield chunk(d.index, v.text, lp=d.logprobs)
                if d.finish_reason:
                    yield chunk(d.index, finish=d.finish_reason)
        if include_usage:
            yield _sse({"id": rid, "object": obj, "created": created, "model": req.model, "choices": [],
                        "usage": _usage(len(prompt_ids), n_out)})
        done = True
        yield "data: [DONE]\n\n"
    except EngineUnavailable as exc:
        status, done = 503, True
        yield _sse(APIError(503, f"the model engine is unavailable ({exc})", code="engine_unavailable").body(),
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
