"""The guarded OpenAI-compatible API (FastAPI) in front of an engine (engines/): the app, its key-gate middleware, and
its routes. The generation request path is serving.py (one serving_*.py per endpoint over it); wire schemas and error
bodies are protocol.py.

Routes: GET /health (no key), /ready, /metrics, /docs, /openapi.json, /v1/models, /v1/monitor/profile; POST
/v1/chat/completions, /v1/completions; admin (admin key): GET /admin/routes, PUT /admin/routes/{name},
POST /admin/routes/{name}/rollback, GET /admin/adapters, PUT|DELETE /admin/adapters/{name} (LoRA adapters loaded and
unloaded at runtime). Every error body is OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from functools import partial
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmstack.config.serve import GuardPolicy, KeyEntry, KeyFile, Route, ServeSpec
from llmstack.monitor import TrafficProfile, compare, load_profile
from llmstack.serve.admission import read_json
from llmstack.serve.audit import AuditLog
from llmstack.serve.engines import EngineRejected, EngineUnavailable
from llmstack.serve.guard import KeyRing, RateLimiter, presented_key
from llmstack.serve.metrics import ServeMetrics
from llmstack.serve.protocol import AdapterLoad, APIError, validation_message
from llmstack.serve.routing import Router, RoutesStoreUnavailable
from llmstack.serve.serving import generate
from llmstack.serve.serving_chat import ChatCompletions
from llmstack.serve.serving_completion import Completions
from llmstack.serve.state import MODEL_NAME, Server, check_routes, keep_in_sync, new_request_id

log = logging.getLogger("llmstack.serve")
ADAPTER_NAME = MODEL_NAME
# the admin action of each admin route, for the audit line of a refused call
ADMIN_ACTIONS = {("GET", "/admin/routes"): "routes_get", ("PUT", "/admin/routes/{name}"): "route_set",
                 ("POST", "/admin/routes/{name}/rollback"): "route_rollback",
                 ("GET", "/admin/adapters"): "adapters_get", ("PUT", "/admin/adapters/{name}"): "adapter_load",
                 ("DELETE", "/admin/adapters/{name}"): "adapter_unload"}
PUBLIC_PATHS = {"/health"}


class SlowReader(Exception):
    """The client read nothing of its response for caps.write_timeout_s: it is dropped, its slots freed."""


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

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                srv.metrics.requests.labels(route, str(status["code"])).inc()
                srv.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            try:
                with anyio.fail_after(srv.policy.caps.write_timeout_s):  # the transport waits while a client reads
                    await send(message)                                 # nothing: not forever
            except TimeoutError:
                srv.metrics.guard_blocks.labels("slow_reader").inc()
                raise SlowReader(path) from None

        try:
            await self._gate(scope, receive, send_wrapped, srv, path)
        except SlowReader:
            log.info("dropped a client that stopped reading its response on %s", path)
        except Exception:  # noqa: BLE001 - the last line: a 500 with a body, never a dropped connection
            log.exception("unexpected error on %s", path)
            if not status.get("started"):
                err = APIError(500, "internal error: the server failed on this request", code="internal_error")
                await err.response()(scope, receive, send_wrapped)

    async def _gate(self, scope, receive, send_wrapped, srv, path):

        if path not in PUBLIC_PATHS:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            entry = srv.keyring.authenticate(presented_key(headers))
            if entry is None:
                srv.metrics.guard_blocks.labels("auth").inc()
                srv.audit.write_unauthenticated({"request_id": new_request_id(), "key_id": None, "route": path,
                                                 "status": 401, "guard": ["auth:missing" if not presented_key(headers)
                                                                          else "auth:invalid"]})
                err = APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await err.response()(scope, receive, send_wrapped)
            scope.setdefault("state", {})["key"] = entry
            length = headers.get("content-length")
            if length and length.isdigit() and int(length) > srv.policy.caps.max_body_bytes:
                srv.metrics.guard_blocks.labels("body_too_large").inc()
                if path.startswith("/admin"):  # refused before any route: audited here, like every refused admin call
                    record = {"request_id": new_request_id("admin"), "key_id": entry.id, "route": path,
                              "admin": "unknown", "status": 413, "detail": {"code": "request_too_large"}}
                    (srv.audit.write if entry.admin else partial(srv.audit.write_sampled, "admin_refused"))(record)
                err = APIError(413, f"request body is {length} bytes; the limit is {srv.policy.caps.max_body_bytes}",
                               code="request_too_large")
                return await err.response()(scope, receive, send_wrapped)
        await self.app(scope, receive, send_wrapped)


ROUTES = {"/health", "/ready", "/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/chat/completions",
          "/v1/completions", "/v1/monitor/profile"}


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


def _routes_store_down(exc: Exception) -> APIError:
    return APIError(503, f"{exc}. Retry shortly", code="store_unavailable", headers={"Retry-After": "5"})


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
                                     if spec.drift_reference else None)
        if not engine.ready:
            await engine.start()
        await srv.sync_adapters()  # the runtime adapters the store lists (a restart, or a replica joining)
        syncing = asyncio.create_task(keep_in_sync(srv)) if router.store is not None else None
        log.info("serving %s with the %s engine", ", ".join(engine.names), engine.kind)
        yield
        if syncing is not None:
            syncing.cancel()
        await engine.shutdown()
        audit.flush()

    app = FastAPI(title="llmstack", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(KeyGate, server_ref=ref)
    app.state.ref = ref

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        _audit_refused(request, exc)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msg, param = validation_message(exc)
        err = APIError(400, msg, param=param)
        _audit_refused(request, err)
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail))
        _audit_refused(request, err)
        return err.response()

    def _audit_refused(request: Request, exc: APIError) -> None:
        """Every refused call to an /admin path is audited once, with the key id, action and status: the ones a
        route did not audit itself (403 admin_only, a bad body, an unknown admin path). Calls refused to a non-admin
        key are sampled per minute like 401s: a flood of them is counted, not stored."""
        if not request.url.path.startswith("/admin") or getattr(request.state, "admin_audited", False):
            return
        key = getattr(request.state, "key", None)
        route = request.scope.get("route")
        action = ADMIN_ACTIONS.get((request.method, getattr(route, "path", None)), "unknown")
        body = exc.body()["error"]
        record = {"request_id": new_request_id("admin"), "key_id": key.id if key else None, "route": request.url.path,
                  "admin": action, "name": str(request.path_params.get("name", ""))[:64] or None,
                  "status": exc.status, "detail": {"code": body.get("code"), "message": body.get("message")}}
        request.state.admin_audited = True
        if key is not None and key.admin:
            ref["server"].audit.write(record)
        else:
            ref["server"].audit.write_sampled("admin_refused", record)

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
            raise APIError(403, "this API key may not change routes or adapters (needs `admin: true` in the key file)",
                           code="admin_only")
        return ref["server"].router

    def _audit_admin(request: Request, action: str, name: str, status: int, detail=None) -> None:
        request.state.admin_audited = True
        ref["server"].audit.write({"request_id": new_request_id("admin"), "key_id": request.state.key.id,
                                   "route": request.url.path, "admin": action, "name": name, "status": status,
                                   "detail": detail})

    @app.get("/admin/routes")
    async def get_routes(request: Request):
        return _admin(request).snapshot()

    @app.put("/admin/routes/{name}")
    async def put_route(name: str, request: Request):
        router = _admin(request)
        if not MODEL_NAME.match(name):
            raise APIError(400, "a route name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                           "digit", param="name", code="invalid_route")
        try:
            route = Route.model_validate(await request.json())
        except (ValidationError, ValueError) as exc:
            raise APIError(400, f"not a valid route: {str(exc)[:500]}", code="invalid_route") from None
        await ref["server"].sync_adapters(max_age=0)  # an adapter loaded on another replica a moment ago
        try:
            check_routes({name: route}, [*engine.names, *router.adapters()])
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_route") from None
        try:
            await asyncio.to_thread(router.set, name, route)
        except RoutesStoreUnavailable as exc:
            _audit_admin(request, "route_set", name, 503)
            raise _routes_store_down(exc) from None
        _audit_admin(request, "route_set", name, 200, route.model_dump(exclude_none=True))
        log.info("route %s set to %s by %s", name, route.model_dump(exclude_none=True), request.state.key.id)
        return router.snapshot()

    @app.post("/admin/routes/{name}/rollback")
    async def rollback_route(name: str, request: Request):
        router = _admin(request)
        try:
            await asyncio.to_thread(router.rollback, name)
        except KeyError as exc:
            _audit_admin(request, "route_rollback", name, 409)
            raise APIError(409, str(exc.args[0]), code="nothing_to_roll_back") from None
        except RoutesStoreUnavailable as exc:
            _audit_admin(request, "route_rollback", name, 503)
            raise _routes_store_down(exc) from None
        _audit_admin(request, "route_rollback", name, 200, router.snapshot().get(name))
        log.info("route %s rolled back by %s", name, request.state.key.id)
        return router.snapshot()

    # ----------------------------------------------------------------------------- adapters loaded at runtime
    def _adapter_engine(request: Request):
        _admin(request)
        if not hasattr(engine, "load_adapter"):
            raise APIError(400, f"the {engine.kind} engine cannot load adapters at runtime", code="not_supported")
        return engine

    def _adapters_view() -> dict:
        return {"base": engine.names[0], "adapters": dict(getattr(engine, "adapters", {}))}

    @app.get("/admin/adapters")
    async def list_adapters(request: Request):
        _admin(request)
        return _adapters_view()

    @app.put("/admin/adapters/{name}")
    async def load_adapter(name: str, request: Request):
        """Serve a LoRA adapter (a folder on this server) as model `name`, without a restart. Keys' model allowlists
        apply to the new name as to any other."""
        srv = ref["server"]
        eng = _adapter_engine(request)
        body = await read_json(request, srv, AdapterLoad)
        async with srv.adapter_lock:  # the name check, the load and the store entry, with no sync in between
            await srv.sync_adapters_locked(max_age=0)
            return await _load_adapter(request, srv, eng, name, body)

    async def _load_adapter(request: Request, srv: Server, eng, name: str, body: AdapterLoad) -> dict:
        status = 400
        try:
            if not ADAPTER_NAME.match(name):
                raise APIError(400, "an adapter name is 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                               "or digit", param="name")
            if name in srv.public_names() or name in srv.router.adapters():
                status = 409
                raise APIError(409, f"'{name}' is already served (a model, adapter or route of that name); unload "
                               "it first or pick another name", code="name_taken")
            folder = _adapter_folder(body.path)
            try:
                await eng.load_adapter(name, str(folder))
            except EngineRejected as exc:
                raise APIError(400, str(exc), param="path", code="adapter_load_failed") from None
            except EngineUnavailable as exc:
                status = 503
                raise APIError(503, f"the model engine is unavailable ({exc}); retry shortly",
                               code="engine_unavailable", headers={"Retry-After": "5"}) from None
            try:  # every replica loads it too
                await asyncio.to_thread(srv.router.set_adapter, name, str(folder))
            except RoutesStoreUnavailable as exc:
                await eng.unload_adapter(name)  # not in the store: not served here either
                status = 503
                raise _routes_store_down(exc) from None
        except APIError:
            _audit_admin(request, "adapter_load", name[:64], status, {"path": body.path[:500]})
            raise
        srv.runtime_adapters.add(name)
        _audit_admin(request, "adapter_load", name, 200, {"path": str(folder)})
        log.info("adapter %s loaded from %s by %s", name, folder, request.state.key.id)
        return _adapters_view()

    def _adapter_folder(path: str) -> Path:
        """The adapter folder, resolved, or a 400: a path the OS refuses (a component past NAME_MAX, a NUL byte, an
        unknown `~user`, a loop) is the client's error, never a 500; with `adapter_roots` set, the resolved folder
        (`..` and symlinks followed) must lie in one of them."""
        try:
            folder = Path(path).expanduser().resolve()
            roots = [Path(r).expanduser().resolve() for r in spec.adapter_roots]
            found = (folder / "adapter_config.json").is_file()
        except (OSError, RuntimeError, ValueError) as exc:
            raise APIError(400, f"not a usable adapter path: {type(exc).__name__}: {str(exc)[:200]}", param="path",
                           code="invalid_path") from None
        if roots and not any(folder.is_relative_to(r) for r in roots):
            raise APIError(400, f"{path[:500]} is outside the folders adapters may be loaded from (adapter_roots)",
                           param="path", code="path_not_allowed")
        if not found:
            raise APIError(400, f"{path[:500]} is not a LoRA adapter folder on this server (no adapter_config.json)",
                           param="path")
        return folder

    @app.delete("/admin/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        srv = ref["server"]
        eng = _adapter_engine(request)
        async with srv.adapter_lock:
            await srv.sync_adapters_locked(max_age=0)
            shared = srv.router.adapters()
            if name not in eng.adapters and name not in shared:
                _audit_admin(request, "adapter_unload", name[:64], 404)
                raise APIError(404, f"no adapter named '{name[:64]}' is loaded", code="adapter_not_found")
            users = [r for r, route in srv.router.snapshot().items()
                     if name in (route.get("primary"), (route.get("canary") or {}).get("model"), route.get("shadow"))]
            if users:
                _audit_admin(request, "adapter_unload", name, 409)
                raise APIError(409, f"route(s) {', '.join(users)} still send traffic to '{name}': change them first",
                               code="adapter_in_use")
            if name in shared:
                try:  # off the store first: from every replica, or (store down) from none
                    await asyncio.to_thread(srv.router.drop_adapter, name)
                except RoutesStoreUnavailable as exc:
                    _audit_admin(request, "adapter_unload", name, 503)
                    raise _routes_store_down(exc) from None
            if name in eng.adapters:
                await eng.unload_adapter(name)
            srv.runtime_adapters.discard(name)
            srv.adapter_errors.pop(name, None)
        _audit_admin(request, "adapter_unload", name, 200)
        log.info("adapter %s unloaded by %s", name, request.state.key.id)
        return _adapters_view()

    # -------------------------------------------------------------------------------------------- generation
    # One Endpoint per route over the shared request path (serving.py); a Responses endpoint would be one more.
    chat, completion = ChatCompletions(), Completions()

    @app.post(chat.route)
    async def chat_completions(request: Request):
        return await generate(request, ref["server"], chat)

    @app.post(completion.route)
    async def completions(request: Request):
        return await generate(request, ref["server"], completion)

    return app
