"""Waiting for a server that is starting: the one readiness poll behind the serve stage's smoke test
(llmstack/stages/serve.py), the in-process local server (serve/local.py), the test fixtures (llmstack/testing.py)
and the benchmarks that start servers. Each caller says what an outcome means to its user."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_ready(url: str, *, headers: dict | None = None, timeout: float = 600.0, poll_s: float = 0.2,
               gone: Callable[[], bool] | None = None) -> str:
    """Poll GET `url` until it answers 200: "ready"; "gone" as soon as `gone()` is true (the server's process or
    thread ended: no point waiting out the timeout); "timeout" once `timeout` seconds have passed."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if gone is not None and gone():
            return "gone"
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return "ready"
        except httpx.HTTPError:
            pass
        if time.monotonic() >= deadline:
            return "timeout"
        time.sleep(poll_s)
