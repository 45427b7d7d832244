"""The one readiness poll (llmstack/serve/readiness.py) every server start waits on: ready once the URL answers 200
(not 503, not a refused connection), given up as soon as the server is gone, or after its timeout."""

import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from llmstack.serve.readiness import wait_ready
from llmstack.testing import free_port


def test_ready_only_on_a_200_and_early_out_when_the_server_is_gone():
    answers = iter([503, 503, 200])
    seen = []

    class Starting(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            self.send_response(next(answers, 200))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Starting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/ready"
        assert wait_ready(url, headers={"Authorization": "Bearer k"}, timeout=10, poll_s=0.01) == "ready"
        assert seen == ["Bearer k"] * 3  # asked until the 200, not past it
    finally:
        server.shutdown()

    nothing = f"http://127.0.0.1:{free_port()}/ready"  # a refused connection is "not yet", not an error
    t = time.monotonic()
    assert wait_ready(nothing, timeout=0.3, poll_s=0.05) == "timeout"
    assert 0.3 <= time.monotonic() - t < 3
    t = time.monotonic()
    assert wait_ready(nothing, timeout=60, gone=lambda: True) == "gone"
    assert time.monotonic() - t < 1  # the server's end is not waited out


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_port_that_does_not_speak_http_is_not_ready_and_no_proxy_is_asked(monkeypatch):
    """A port answering garbage is "not yet", not a crash; an http_proxy meant for the outside world is not asked
    about this machine's own server (a proxy answering 200 for it would make a server that is not there "ready")."""
    import socket
    import urllib.request

    garbage = socket.socket()
    garbage.bind(("127.0.0.1", 0))
    garbage.listen()
    stop = threading.Event()

    def babble():
        garbage.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = garbage.accept()
            except OSError:
                continue
            conn.sendall(b"not http at all\r\n\r\n")
            conn.close()

    threading.Thread(target=babble, daemon=True).start()
    try:
        assert wait_ready(f"http://127.0.0.1:{garbage.getsockname()[1]}/ready", timeout=0.5, poll_s=0.05) == "timeout"
    finally:
        stop.set()
        garbage.close()

    proxy = HTTPServer(("127.0.0.1", 0), _Ok)  # says 200 to whatever it is asked to fetch
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server_port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's cached opener read the environment before
    try:
        assert wait_ready(f"http://127.0.0.1:{free_port()}/ready", timeout=0.5, poll_s=0.05) == "timeout"
    finally:
        proxy.shutdown()
