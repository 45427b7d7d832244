"""Canary and shadow routing: one public model name, several versions behind it.

    routes:
      assistant:                          # the name clients send
        primary: assistant-v1             # a model the engine serves (its base name or a LoRA adapter name)
        canary: {model: assistant-v2, percent: 10}
        shadow: assistant-v3              # gets a copy of every request; its answers are logged, never returned

The split is a hash of a sticky key (the request's `user` field when given, else the API key id, else the request id)
so one user keeps seeing one version (on every replica: the hash is all there is to it). Every change of a route is
kept, and `rollback` restores the previous routing in one step (`llmstack route rollback NAME` calls the server's
admin endpoint).

Where the routes live (`serve.routes_store`): in memory (the YAML's routes, lost on restart), in a JSON file (a restart
keeps what the last change left), or in redis (`redis://…`, the same store the rate limits can use): every replica
reads the routes from there, so a `route set` or `rollback` sent to any replica is what all of them serve within
`refresh_s`, and survives restarts (a redis that comes back empty is given the routes the replicas serve again). LoRA
adapters loaded at runtime (`llmstack adapters load`) are kept there too, as name -> folder: every replica loads what
the store lists and unloads what it no longer lists (the folder must be at the same path on every replica: a shared
volume), and a restarted replica loads them again. Changes are read-modify-write
transactions (redis WATCH/MULTI, a file lock), so two admins on two replicas cannot lose each other's change.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmstack.config.serve import Route


def bucket(sticky: str, name: str) -> float:
    """A stable number in [0, 100) for (sticky key, route): the same user lands on the same side every time."""
    digest = hashlib.sha256(f"{name}\0{sticky}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1_000_000 / 10_000


class RoutesStoreUnavailable(Exception):
    """The routes store cannot be read or written (redis down, a file that cannot be written)."""


class FileStore:
    """Routes and history in a JSON file, replaced atomically; changes under an exclusive lock file."""

    errors: tuple = (OSError, ValueError)  # what a failing store raises (a full disk, a file cut short)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict | None:
        return json.loads(self.path.read_text()) if self.path.is_file() else None

    def update(self, change: Callable[[dict | None], dict]) -> dict:
        from filelock import FileLock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            state = change(self.load())
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, self.path)
            return state


class RedisStore:
    """Routes and history under one redis key; changes are WATCH/MULTI transactions (retried on a concurrent write)."""

    KEY = "llmstack:routes"

    def __init__(self, url: str):
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.errors = (redis.RedisError, OSError)

    def load(self) -> dict | None:
        raw = self.client.get(self.KEY)
        return json.loads(raw) if raw else None

    def update(self, change: Callable[[dict | None], dict]) -> dict:
        import redis

        while True:
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(self.KEY)
                    raw = pipe.get(self.KEY)
                    state = change(json.loads(raw) if raw else None)
                    pipe.multi()
                    pipe.set(self.KEY, json.dumps(state))
                    pipe.execute()
                    return state
                except redis.WatchError:
                    continue


def open_store(where: str | None):
    if not where:
        return None
    return RedisStore(where) if where.startswith(("redis://", "rediss://", "redis+unix://")) else FileStore(where)


def _dump(routes: dict[str, Route], history: dict[str, list[Route | None]], adapters: dict[str, str]) -> dict:
    return {"routes": {n: r.model_dump(exclude_none=True) for n, r in routes.items()},
            "history": {n: [None if r is None else r.model_dump(exclude_none=True) for r in h]
                        for n, h in history.items()},
            "adapters": dict(adapters)}


def _parse(state: dict) -> tuple[dict[str, Route], dict[str, list[Route | None]], dict[str, str]]:
    return ({n: Route.model_validate(r) for n, r in state["routes"].items()},
            {n: [None if r is None else Route.model_validate(r) for r in h] for n, h in state["history"].items()},
            dict(state.get("adapters") or {}))  # a store written before adapters were kept there has none


class Router:
    """Thread-safe routing table with a history per route (for rollback), kept in a store when one is given (see the
    module docstring): the store's state wins over the YAML's routes, which only seed an empty store.

    Reading the store is blocking I/O. A server sets `background = True` and calls `refresh()` from a thread every
    refresh_s: requests then only read what is in memory, and a store that hangs or is down never stalls or fails
    them (they are routed as last read; `on_error` counts each failed read). Without that, reads refresh inline."""

    def __init__(self, routes: dict[str, Route] | None = None, store: str | None = None, refresh_s: float = 1.0):
        self._routes = dict(routes or {})
        self._history: dict[str, list[Route | None]] = {}
        self._adapters: dict[str, str] = {}  # LoRA adapters loaded at runtime: name -> folder (every replica loads)
        self._lock = threading.Lock()
        self.store = open_store(store)
        self.refresh_s, self._loaded = refresh_s, 0.0
        self.background = False  # True: the owner calls refresh() itself (off the event loop)
        self.on_error: Callable[[Exception], None] = lambda exc: None
        if self.store is not None:
            seed = _dump(self._routes, self._history, self._adapters)
            try:
                self._set_state(self.store.update(lambda state: state or seed))
            except self.store.errors as exc:
                raise RoutesStoreUnavailable(f"routes_store {store}: cannot read it ({type(exc).__name__}: "
                                             f"{exc})") from None

    def _set_state(self, state: dict, read_at: float | None = None) -> None:
        """`read_at`: when the read began (what it shows is at least that recent; a write after it may be missing)."""
        self._routes, self._history, self._adapters = _parse(state)
        self._loaded = time.monotonic() if read_at is None else read_at

    def refresh(self, max_age: float | None = None) -> None:
        """Read the store again if the last read is older than max_age (default refresh_s). A failed read keeps
        what was read last, counts (on_error) and is tried again after refresh_s."""
        age = self.refresh_s if max_age is None else max_age
        started = time.monotonic()
        if self.store is None or started - self._loaded <= age:
            return
        try:
            state = self.store.load()
            if state is None:  # came back empty (a redis restarted without persistence): put back what is served
                with self._lock:
                    mine = _dump(self._routes, self._history, self._adapters)
                state = self.store.update(lambda found: found or mine)  # another replica may have been first
        except self.store.errors as exc:
            self._loaded = started
            self.on_error(exc)
            return
        with self._lock:
            if self._loaded <= started:  # else a change made here meanwhile is newer than this read
                self._set_state(state, started)

    def _fresh(self) -> None:
        """Another replica may have changed the routes: read them again when the last read is refresh_s old
        (unless the owner refreshes in the background)."""
        if not self.background:
            self.refresh()

    def names(self) -> list[str]:
        self._fresh()
        return list(self._routes)

    def targets(self) -> set[str]:
        self._fresh()
        out = set()
        for r in self._routes.values():
            out |= {r.primary, *([r.canary.model] if r.canary else []), *([r.shadow] if r.shadow else [])}
        return out

    def get(self, name: str) -> Route | None:
        self._fresh()
        return self._routes.get(name)

    def pick(self, name: str, sticky: str) -> tuple[str, str, str | None]:
        """(model to answer with, 'primary' | 'canary', shadow model or None). Names without a route pass through."""
        self._fresh()
        route = self._routes.get(name)
        if route is None:
            return name, "primary", None
        if route.canary and bucket(sticky, name) < route.canary.percent:
            return route.canary.model, "canary", route.shadow
        return route.primary, "primary", route.shadow

    def _change(self, apply: Callable[[dict[str, Route], dict[str, list[Route | None]]], Any]) -> Any:
        """Apply a change to the current state (the store's, read inside its transaction), then keep the result."""
        result: dict = {}

        def change(state: dict | None) -> dict:
            routes, history, adapters = _parse(state) if state else (
                dict(self._routes), copy.deepcopy(self._history), dict(self._adapters))
            result["value"] = apply(routes, history, adapters)
            return _dump(routes, history, adapters)

        with self._lock:
            if self.store is None:
                state = change(_dump(self._routes, self._history, self._adapters))
            else:
                try:
                    state = self.store.update(change)
                except self.store.errors as exc:
                    self.on_error(exc)
                    raise RoutesStoreUnavailable(f"the routes store is unavailable ({type(exc).__name__}: "
                                                 f"{str(exc)[:200]}); nothing was changed") from None
            self._set_state(state)
        return result["value"]

    def set(self, name: str, route: Route) -> None:
        def apply(routes, history, adapters):
            history.setdefault(name, []).append(copy.deepcopy(routes.get(name)))
            routes[name] = route

        self._change(apply)

    def rollback(self, name: str) -> Route | None:
        def apply(routes, history, adapters):
            if not history.get(name):
                raise KeyError(f"route '{name}' has no earlier version to roll back to")
            previous = history[name].pop()
            if previous is None:
                routes.pop(name, None)
            else:
                routes[name] = previous
            return previous

        return self._change(apply)

    # ---- runtime adapters: which LoRA folders every replica should serve, and under which names
    def adapters(self, max_age: float | None = None) -> dict[str, str]:
        """The runtime adapters the store lists, read at most max_age s ago (blocking: call it off the event loop
        when max_age is given)."""
        if max_age is None:
            self._fresh()
        else:
            self.refresh(max_age)
        return dict(self._adapters)

    def set_adapter(self, name: str, path: str) -> None:
        self._change(lambda routes, history, adapters: adapters.__setitem__(name, path))

    def drop_adapter(self, name: str) -> None:
        self._change(lambda routes, history, adapters: adapters.pop(name, None))

    def snapshot(self) -> dict[str, Any]:
        self._fresh()
        return {n: r.model_dump(exclude_none=True) for n, r in self._routes.items()}
