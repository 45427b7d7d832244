"""The admin routes of the guarded API (admin key): GET /admin/routes, PUT /admin/routes/{name}, POST
/admin/routes/{name}/rollback (canary/shadow routes and their rollback), GET /admin/adapters, PUT|DELETE
/admin/adapters/{name} (LoRA adapters loaded and unloaded at runtime), GET /admin/usage (the usage records of spend
budgets: per key, model and UTC day); and the audit of every refused admin call.
A route audits what it did; `audit_refused` audits what was refused before or around it, once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from fastapi import FastAPI, Request
from pydantic import ValidationError

from llmstack.config.serve import KeyEntry, Route, ServeSpec
from llmstack.serve.admission import read_json
from llmstack.serve.budget import MAX_REPORT_DAYS
from llmstack.serve.engines import EngineRejected, EngineUnavailable
from llmstack.serve.guard import RateLimitStoreUnavailable
from llmstack.serve.protocol import AdapterLoad, APIError
from llmstack.serve.routing import Router, RoutesStoreUnavailable
from llmstack.serve.state import MODEL_NAME, Server, check_routes, new_request_id

log = logging.getLogger("llmstack.serve")
ADAPTER_NAME = MODEL_NAME
# the admin action of each admin route, for the audit line of a refused call
ADMIN_ACTIONS = {("GET", "/admin/routes"): "routes_get", ("PUT", "/admin/routes/{name}"): "route_set",
                 ("POST", "/admin/routes/{name}/rollback"): "route_rollback",
                 ("GET", "/admin/adapters"): "adapters_get", ("PUT", "/admin/adapters/{name}"): "adapter_load",
                 ("DELETE", "/admin/adapters/{name}"): "adapter_unload", ("GET", "/admin/usage"): "usage_get"}


def write_refused(srv: Server, key: KeyEntry | None, record: dict) -> None:
    """A refused admin call's audit line: always for an admin key; sampled per minute like 401s for any other key, so
    a flood of them is counted, not stored."""
    if key is not None and key.admin:
        srv.audit.write(record)
    else:
        srv.audit.write_sampled("admin_refused", record)


def audit_refused(srv: Server, request: Request, exc: APIError) -> None:
    """Every refused call to an /admin path is audited once, with the key id, action and status: the ones a route did
    not audit itself (403 admin_only, a bad body, an unknown admin path)."""
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
    write_refused(srv, key, record)


def routes_store_down(exc: Exception) -> APIError:
    return APIError(503, f"{exc}. Retry shortly", code="store_unavailable", headers={"Retry-After": "5"})


def add_admin_routes(app: FastAPI, ref: dict, engine, spec: ServeSpec) -> None:
    """The admin routes, over the server `ref["server"]` the app's lifespan builds."""
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
            raise routes_store_down(exc) from None
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
            raise routes_store_down(exc) from None
        _audit_admin(request, "route_rollback", name, 200, router.snapshot().get(name))
        log.info("route %s rolled back by %s", name, request.state.key.id)
        return router.snapshot()

    # ------------------------------------------------------------------------------------ usage (spend budgets)
    @app.get("/admin/usage")
    async def usage(request: Request, key: str | None = None, model: str | None = None, since: str | None = None,
                    until: str | None = None):
        """Usage records per key, model and UTC day (`since` / `until`: YYYY-MM-DD, inclusive; default the last 30
        days), with their totals."""
        if not request.state.key.admin:
            raise APIError(403, "this API key may not read usage (needs `admin: true` in the key file)",
                           code="admin_only")
        today = datetime.now(UTC).date()
        last = _day(until, "until") if until else today
        first = _day(since, "since") if since else last - timedelta(days=29)
        if first > last or (last - first).days >= MAX_REPORT_DAYS:
            raise APIError(400, f"since..until must be a range of 1 to {MAX_REPORT_DAYS} days, since first",
                           param="since", code="invalid_range")
        try:
            rows = await ref["server"].budgets.usage(first, last, key=key, model=model)
        except RateLimitStoreUnavailable as exc:
            raise routes_store_down(exc) from None
        totals = {f: sum(r[f] for r in rows) for f in ("requests", "input_tokens", "output_tokens", "cost_usd")}
        return {"since": first.isoformat(), "until": last.isoformat(), "rows": rows, "totals": totals}

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
                raise routes_store_down(exc) from None
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
                    raise routes_store_down(exc) from None
            if name in eng.adapters:
                await eng.unload_adapter(name)
            srv.runtime_adapters.discard(name)
            srv.adapter_errors.pop(name, None)
        _audit_admin(request, "adapter_unload", name, 200)
        log.info("adapter %s unloaded by %s", name, request.state.key.id)
        return _adapters_view()


def _day(text: str, param: str) -> date:
    try:
        if len(text) != 10:  # fromisoformat also reads week dates and times: only a day is meant here
            raise ValueError(text)
        return date.fromisoformat(text)
    except ValueError:
        raise APIError(400, f"{param} must be a UTC day as YYYY-MM-DD", param=param, code="invalid_date") from None
