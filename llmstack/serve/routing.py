"""Canary and shadow routing: one public model name, several versions behind it.

    routes:
      assistant:                          # the name clients send
        primary: assistant-v1             # a model the engine serves (its base name or a LoRA adapter name)
        canary: {model: assistant-v2, percent: 10}
        shadow: assistant-v3              # gets a copy of every request; its answers are logged, never returned

The split is a hash of a sticky key (the request's `user` field when given, else the API key id, else the request id)
so one user keeps seeing one version. Every change of a route is kept, and `rollback` restores the previous routing
in one step (`llmstack route rollback NAME` calls the server's admin endpoint).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from llmstack.config.serve import Route


def bucket(sticky: str, name: str) -> float:
    """A stable number in [0, 100) for (sticky key, route): the same user lands on the same side every time."""
    digest = hashlib.sha256(f"{name}\0{sticky}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1_000_000 / 10_000


class Router:
    """Thread-safe routing table with a history per route (for rollback). With `state_path`, the table and its history
    are kept in that JSON file (written atomically on every change, read at start): a restart does not silently undo
    a rollback, and replicas started on one file agree."""

    def __init__(self, routes: dict[str, Route] | None = None, state_path: str | Path | None = None):
        self._routes = dict(routes or {})
        self._history: dict[str, list[Route | None]] = {}
        self._lock = threading.Lock()
        self.state_path = Path(state_path) if state_path else None
        if self.state_path and self.state_path.is_file():
            state = json.loads(self.state_path.read_text())
            self._routes = {n: Route.model_validate(r) for n, r in state["routes"].items()}
            self._history = {n: [None if r is None else Route.model_validate(r) for r in h]
                             for n, h in state["history"].items()}

    def _save(self) -> None:
        if not self.state_path:
            return
        state = {"routes": {n: r.model_dump(exclude_none=True) for n, r in self._routes.items()},
                 "history": {n: [None if r is None else r.model_dump(exclude_none=True) for r in h]
                             for n, h in self._history.items()}}
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.state_path)

    def names(self) -> list[str]:
        return list(self._routes)

    def targets(self) -> set[str]:
        out = set()
        for r in self._routes.values():
            out |= {r.primary, *([r.canary.model] if r.canary else []), *([r.shadow] if r.shadow else [])}
        return out

    def get(self, name: str) -> Route | None:
        return self._routes.get(name)

    def pick(self, name: str, sticky: str) -> tuple[str, str, str | None]:
        """(model to answer with, 'primary' | 'canary', shadow model or None). Names without a route pass through."""
        route = self._routes.get(name)
        if route is None:
            return name, "primary", None
        if route.canary and bucket(sticky, name) < route.canary.percent:
            return route.canary.model, "canary", route.shadow
        return route.primary, "primary", route.shadow

    def set(self, name: str, route: Route) -> None:
        with self._lock:
            self._history.setdefault(name, []).append(copy.deepcopy(self._routes.get(name)))
            self._routes[name] = route
            self._save()

    def rollback(self, name: str) -> Route | None:
        with self._lock:
            if not self._history.get(name):
                raise KeyError(f"route '{name}' has no earlier version to roll back to")
            previous = self._history[name].pop()
            if previous is None:
                self._routes.pop(name, None)
            else:
                self._routes[name] = previous
            self._save()
            return previous

    def snapshot(self) -> dict[str, Any]:
        return {n: r.model_dump(exclude_none=True) for n, r in self._routes.items()}
