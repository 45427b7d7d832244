"""The guarded OpenAI-compatible API (FastAPI) in front of an engine (engines/): the app, its key-gate middleware, and
its routes. The generation request path is serving.py (one serving_*.py per endpoint over it); wire schemas and error
bodies are protocol.py.

Routes: GET /health (no key), /ready, /metrics, /docs, /openapi.json, /v1/models, /v1/monitor/profile; POST
/v1/chat/completions, /v1/completions, /v1/responses (and GET / DELETE /v1/responses/{id}); POST /v1/messages is
Anthropic's Messages API (serving_messages.py); the admin routes (admin key: routes, rollback, runtime adapters) are
admin.py's. Every error body is OpenAI-shaped: {"error": {"message", "type", "param", "code"}}, except on a route of
ERROR_BODIES (/v1/messages: Anthropic's). The OpenAPI document of these routes is openapi.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmstack.config.serve import GuardPolicy, KeyEntry, KeyFile, ServeSpec
from llmstack.monitor import TrafficProfile, compare, load_profile
from llmstack.serve.admin import add_admin_routes, audit_refused, write_refused
from llmstack.serve.audit import AuditLog
from llmstack.serve.budget import BudgetStore
from llmstack.serve.guard import KeyRing, RateLimiter, presented_key
from llmstack.serve.metrics import ServeMetrics
from llmstack.serve.openapi import install as install_openapi
from llmstack.serve.protocol import APIError, validation_message
from llmstack.serve.protocol_messages import error_body as messages_error_body
from llmstack.serve.responses_store import ResponseStore
from llmstack.serve.routing import Router
from llmstack.serve.serving import generate
from llmstack.serve.serving_chat import ChatCompletions
from llmstack.serve.serving_completion import Completions
from llmstack.serve.serving_messages import Messages
from llmstack.serve.serving_responses import Responses, stored_response
from llmstack.serve.state import Server, check_routes, keep_in_sync, new_request_id
from llmstack.serve.tracing import TracedAudit, Tracing

log = logging.getLogger("llmstack.serve")
PUBLIC_PATHS = {"/health"}


class SlowReader(Exception):
    """The client read nothing of its response for caps.write_timeout_s: it is dropped, its slots freed."""


class WriteDeadline:
    """No send of one response may wait longer than `timeout_s` for its client to read: the send in progress is
    cancelled and raises SlowReader. What asyncio.timeout around each send would do, but with one timer per response
    rather than one per send: a stream sends once per token, and a timer armed and cancelled per chunk cost more than
    the rest of the chunk's sending. The timer wakes every `timeout_s`, or when the send under way turns `timeout_s`
    old."""

    def __init__(self, timeout_s: float):
        self.loop, self.timeout_s = asyncio.get_running_loop(), timeout_s
        self.since: float | None = None  # when the send under way began
        self.sender: asyncio.Task | None = None  # the task it runs in (Starlette streams from a task of their own)
        self.expired = False
        self.handle = self.loop.call_later(timeout_s, self._check)

    def _check(self) -> None:
        since = self.since
        if since is not None and self.loop.time() - since >= self.timeout_s:
            self.expired = True
            self.sender.cancel()
        else:
            self.handle = self.loop.call_at((self.loop.time() if since is None else since) + self.timeout_s,
                                            self._check)

    async def send(self, send, message) -> None:
        self.sender = task = asyncio.current_task()
        cancelling = task.cancelling()
        self.since = self.loop.time()
        try:
            await send(message)
        except asyncio.CancelledError:
            # ours, and no one else's cancellation pending (as asyncio.timeout decides): the client is too slow
            if self.expired and task.uncancel() <= cancelling:
                raise SlowReader from None
            raise
        finally:
            self.since = None

    def close(self) -> None:
        self.handle.cancel()


class KeyGate:
    """ASGI middleware: every path but /health needs a valid key (docs and metrics included); bodies past the cap by
    Content-Length get 413 before they are read. Also counts requests and latency per route for /metrics.

    It is also the last line: an exception nothing else handled becomes an OpenAI-shaped 500 here, sent as a complete
    response, so the client's kept-alive connection survives (Starlette's own error middleware re-raises, and uvicorn
    then drops the connection). A client that stops reading is cut off after caps.write_timeout_s."""

    def __init__(self, app, server_ref: dict):
        self.app, self.ref = app, server_ref

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        srv: Server = self.ref["server"]
        path, t0, status = scope["path"], time.perf_counter(), {"code": 500}
        route = path if path in ROUTES else "other"

        deadline = WriteDeadline(srv.policy.caps.write_timeout_s)

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                srv.metrics.requests.labels(route, str(status["code"])).inc()
                srv.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            try:  # the transport waits while a client reads nothing: not forever
                await deadline.send(send, message)
            except SlowReader:
                srv.metrics.guard_blocks.labels("slow_reader").inc()
                raise

        with srv.tracing.request(scope, status):  # a generation request's span: until its last byte went out
            try:
                await self._gate(scope, receive, send_wrapped, srv, path)
            except SlowReader:
                log.info("dropped a client that stopped reading its response on %s", path)
            except Exception:  # noqa: BLE001 - the last line: a 500 with a body, never a dropped connection
                log.exception("unexpected error on %s", path)
                if not status.get("started"):
                    err = APIError(500, "internal error: the server failed on this request", code="internal_error")
                    await error_response(path, err)(scope, receive, send_wrapped)
            finally:
                deadline.close()

    async def _gate(self, scope, receive, send_wrapped, srv, path):

        if path not in PUBLIC_PATHS:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            with srv.tracing.span("auth"):
                entry = srv.keyring.authenticate(presented_key(headers))
            if entry is None:
                srv.metrics.guard_blocks.labels("auth").inc()
                srv.audit.write_unauthenticated({"request_id": new_request_id(), "key_id": None, "route": path,
                                                 "status": 401, "guard": ["auth:missing" if not presented_key(headers)
                                                                          else "auth:invalid"]})
                err = APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>` (or "
                               "`x-api-key: <key>`)", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error_response(path, err)(scope, receive, send_wrapped)
            scope.setdefault("state", {})["key"] = entry
            length = headers.get("content-length")
            if length and length.isdigit() and int(length) > srv.policy.caps.max_body_bytes:
                srv.metrics.guard_blocks.labels("body_too_large").inc()
                if path.startswith("/admin"):  # refused before any route: audited here, like every refused admin call
                    record = {"request_id": new_request_id("admin"), "key_id": entry.id, "route": path,
                              "admin": "unknown", "status": 413, "detail": {"code": "request_too_large"}}
                    write_refused(srv, entry, record)
                err = APIError(413, f"request body is {length} bytes; the limit is {srv.policy.caps.max_body_bytes}",
                               code="request_too_large")
                return await error_response(path, err)(scope, receive, send_wrapped)
        await self.app(scope, receive, send_wrapped)


ROUTES = {"/health", "/ready", "/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/chat/completions",
          "/v1/completions", "/v1/monitor/profile", "/v1/responses", Messages.route}
# The error body of each route that speaks another API than OpenAI's, from the key gate's 401 to a stream's last error.
ERROR_BODIES = {Messages.route: messages_error_body}


def error_response(path: str, err: APIError) -> JSONResponse:
    """`err` in the shape of the API the route speaks: OpenAI's unless ERROR_BODIES names the route (or a path under
    it, such as Anthropic's /v1/messages/count_tokens, which is not served)."""
    body = next((b for route, b in ERROR_BODIES.items() if path == route or path.startswith(route + "/")), None)
    return err.response() if body is None else JSONResponse(body(err), status_code=err.status, headers=err.headers)


def allowed_methods(app: FastAPI, path: str) -> str:
    """The `Allow` header of a 405 (RFC 9110): the methods of every route whose path matches (FastAPI's routes take
    no HEAD of their own)."""
    return ", ".join(sorted({m for r in app.router.routes if isinstance(r, APIRoute) and r.path_regex.match(path)
                             for m in r.methods}))


def _store_errors(metrics: ServeMetrics, store: str, meanwhile: str):
    """The on_error hook of a shared store: count every failure (llmstack_store_errors_total{store}, which an alert
    watches), log at most one line per 10 s (an outage under load would otherwise write thousands a second)."""
    last = [float("-inf")]

    def record(exc: Exception) -> None:
        metrics.store_errors.labels(store).inc()
        if time.monotonic() - last[0] > 10:
            last[0] = time.monotonic()
            log.warning("the %s store failed (%s: %s); %s", store, type(exc).__name__, str(exc)[:200], meanwhile)
    return record


def build_app(engine, spec: ServeSpec, policy: GuardPolicy | None = None, keys: KeyFile | None = None,
              audit_path: str | None = None) -> FastAPI:
    """The app. The engine is started in the app's lifespan and shut down (after uvicorn drains) at its end."""
    policy = policy or GuardPolicy()
    ref: dict = {}
    check_routes(spec.routes, engine.names)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        metrics = ServeMetrics()
        audit = AuditLog(audit_path or spec.audit_log, policy.audit.log_prompts, policy.audit.max_field_chars,
                         policy.audit.unauthenticated_per_minute, on_failure=metrics.audit_failures.inc,
                         on_drop=lambda reason: metrics.audit_dropped.labels(reason).inc())
        tracing = Tracing(spec.tracing)
        if tracing.enabled:
            audit = TracedAudit(audit, tracing)
        router = Router(spec.routes, store=spec.routes_store)
        router.on_error = _store_errors(metrics, "routes", "requests are routed as last read; route and adapter "
                                                           "changes are refused with 503 until it is back")
        router.background = router.store is not None  # keep_in_sync reads the store; requests never wait on it
        # a persisted route must still fit: what this engine serves, or a runtime adapter the store lists
        check_routes({n: router.get(n) for n in router.names()}, [*engine.names, *router.adapters()])
        limiter = RateLimiter(policy, on_store_error=_store_errors(
            metrics, "rate_limits", f"rate_limits.on_store_error: {policy.rate_limits.on_store_error}"))
        ref["server"] = srv = Server(engine=engine, spec=spec, policy=policy, keyring=KeyRing(keys or KeyFile(keys=[])),
                                     limiter=limiter, metrics=metrics, audit=audit, router=router,
                                     traffic=TrafficProfile(), drift_reference=load_profile(spec.drift_reference)
                                     if spec.drift_reference else None,
                                     responses=ResponseStore(spec.routes_store, spec.responses), tracing=tracing,
                                     budgets=BudgetStore(policy, spec.prices, on_store_error=_store_errors(
                                         metrics, "budgets", "rate_limits.on_store_error: "
                                         f"{policy.rate_limits.on_store_error}")))
        if not engine.ready:
            await engine.start()
        await srv.sync_adapters()  # the runtime adapters the store lists (a restart, or a replica joining)
        syncing = asyncio.create_task(keep_in_sync(srv)) if router.store is not None else None
        log.info("serving %s with the %s engine", ", ".join(engine.names), engine.kind)
        yield
        if syncing is not None:
            syncing.cancel()
        await engine.shutdown()
        await srv.budgets.close()
        audit.flush()
        await anyio.to_thread.run_sync(tracing.shutdown)  # the last spans, exported off the event loop

    app = FastAPI(title="llmstack", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(KeyGate, server_ref=ref)
    app.state.ref = ref

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        audit_refused(ref["server"], request, exc)
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msg, param = validation_message(exc)
        err = APIError(400, msg, param=param)
        audit_refused(ref["server"], request, err)
        return error_response(request.url.path, err)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method the path takes (Starlette names only the first route's)
            headers["Allow"] = allowed_methods(app, request.url.path)
        err = APIError(exc.status_code, str(exc.detail), headers=headers)
        audit_refused(ref["server"], request, err)
        return error_response(request.url.path, err)

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

    add_admin_routes(app, ref, engine, spec)

    # -------------------------------------------------------------------------------------------- generation
    # One Endpoint per route over the shared request path (serving.py).
    chat, completion = ChatCompletions(), Completions()

    @app.post(chat.route)
    async def chat_completions(request: Request):
        return await generate(request, ref["server"], chat)

    @app.post(completion.route)
    async def completions(request: Request):
        return await generate(request, ref["server"], completion)

    responses = Responses()

    @app.post(responses.route)
    async def create_response(request: Request):
        return await generate(request, ref["server"], responses)

    @app.get(responses.route + "/{response_id}")
    async def get_response(request: Request, response_id: str):
        return await stored_response(request, ref["server"], response_id, delete=False)

    @app.delete(responses.route + "/{response_id}")
    async def delete_response(request: Request, response_id: str):
        return await stored_response(request, ref["server"], response_id, delete=True)

    anthropic_messages = Messages()

    @app.post(anthropic_messages.route)
    async def messages(request: Request):
        return await generate(request, ref["server"], anthropic_messages)

    install_openapi(app, engine.names[0])  # /openapi.json: every route above, described (openapi.py)
    return app
