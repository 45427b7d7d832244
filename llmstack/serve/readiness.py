"""Waiting for a server that is starting: the one readiness poll behind the serve stage's smoke test
(llmstack/stages/serve.py), the in-process local server (serve/local.py), the test fixtures (llmstack/testing.py)
and the benchmarks that start servers. Each caller says what an outcome means to its user."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_ready(url: str, *, headers: dict | None = None, timeout: float = 600.0, poll_s: float = 0.2,
               gone: Callable[[], bool] | None = None) -> str:
    """Poll GET `url` until it answers 200: "ready"; "gone" as soon as `gone()` is true (the server's process or
    thread ended: no point waiting out the timeout); "timeout" once `timeout` seconds have passed.

    urllib, not httpx: `httpx.get` builds a client, and with it an SSL context, on every call (~30 ms of CPU here),
    which polled every 0.2 s took a sixth of a core from the server it was waiting for; a urllib request is ~0.1 ms.
    No proxy: the servers waited for are this machine's, and an http_proxy set for the outside world would never
    reach them."""
    import http.client
    import urllib.request

    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        if gone is not None and gone():
            return "gone"
        try:
            with opener.open(request, timeout=2) as answer:
                if answer.status == 200:
                    return "ready"
        # refused, reset or timed out (OSError), a 4xx/5xx (HTTPError, an OSError too), not HTTP at all
        except (OSError, http.client.HTTPException):
            pass
        if time.monotonic() >= deadline:
            return "timeout"
        time.sleep(poll_s)
