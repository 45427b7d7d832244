"""The export side of tracing.py: finished requests' spans, as plain tuples, go over a pipe to a child process
(`python -m llmstack.serve.tracing_export`) that builds the SDK's `ReadableSpan`s and sends them with the SDK's
`OTLPSpanExporter` — so neither building spans nor encoding protobuf runs under the API process's GIL.

The API side (`ExportPipe`) keeps a bounded queue that a sender thread drains in batches every schedule delay (the
SDK's BatchSpanProcessor settings: OTEL_BSP_SCHEDULE_DELAY, OTEL_BSP_MAX_QUEUE_SIZE, OTEL_BSP_MAX_EXPORT_BATCH_SIZE
are read the same way). A collector that is slow or down blocks only the child, then the sender thread on the full
pipe; past the queue's size the oldest requests' spans are dropped and counted. A request only appends to a deque.
The child exits, after exporting what it has, when its stdin closes — the server's shutdown, or the server dying; it
ignores SIGINT and SIGTERM, which a process group's signal would otherwise deliver before the server's last spans.

Frames on the pipe: a 4-byte big-endian length, then a pickle of ("spans", [record, ...]) or ("flush", n); the child
answers a flush with the line `n` on its stdout once everything before it was exported. Only the parent process
writes the pipe, so unpickling it trusts no one else.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time

log = logging.getLogger("llmstack.serve")


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


class ExportPipe:
    """The API process's end: `put` a finished request's record; `flush` / `shutdown` wait for the child."""

    def __init__(self, opts):
        self.delay_s = _env_int("OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self.max_queue = _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self.batch = _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)
        self.timeout_s = opts.export_timeout_s
        config = {"endpoint": opts.otlp_endpoint, "timeout": opts.export_timeout_s,
                  "service_name": opts.service_name}
        self.proc = subprocess.Popen([sys.executable, "-m", "llmstack.serve.tracing_export", json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.pending: collections.deque = collections.deque()
        self.dropped = 0
        self._wake = threading.Event()
        self._write_lock = threading.Lock()  # the sender thread and flush() both write frames
        self._closed = self._broken = False
        self._flushes = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="llmstack-span-sender")
        self._thread.start()

    def put(self, record: tuple) -> None:
        if len(self.pending) >= self.max_queue:  # the collector is behind: the oldest spans go, requests never wait
            self.pending.popleft()
            self.dropped += 1
        self.pending.append(record)
        if len(self.pending) >= self.batch:
            self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            with self._write_lock:
                self._send_pending()

    def _send_pending(self) -> None:
        while self.pending and not self._broken:
            batch = [self.pending.popleft() for _ in range(min(self.batch, len(self.pending)))]
            self._write(("spans", batch))

    def _write(self, message: tuple) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(struct.pack(">I", len(data)) + data)
            self.proc.stdin.flush()
        except (OSError, ValueError) as exc:  # the child died: spans are dropped from now on, requests go on
            if not self._broken:
                log.warning("the span export process is gone (%s); traces are no longer exported", exc)
            self._broken = True
            self.pending.clear()

    def flush(self, timeout_s: float) -> bool:
        """Send everything queued and wait until the child has exported it (or `timeout_s` passed)."""
        with self._write_lock:
            self._send_pending()
            self._flushes += 1
            n = self._flushes
            self._write(("flush", n))
        deadline = time.monotonic() + timeout_s
        while not self._broken and time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:
                return False
            if int(line) == n:
                return True
        return False

    def shutdown(self) -> None:
        """Send what is queued and let the child export it, within the export timeout (plus a little); a child still
        stuck on a collector after that is killed, and what it held is lost."""
        deadline = time.monotonic() + self.timeout_s + 5
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=self.timeout_s + 5)
        if self._write_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            try:
                self._send_pending()
                self.proc.stdin.close()  # the child exports what it has, then exits
            except OSError:
                pass
            finally:
                self._write_lock.release()
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------- the export process
def _spans(record: tuple, resource, scope) -> list:
    """One request's record as the SDK's ReadableSpans: its SERVER span and the children under it."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

    trace_id, remote_parent, trace_state, root, children = record
    state = TraceState.from_header([trace_state]) if trace_state else None
    flags = TraceFlags(TraceFlags.SAMPLED)

    def context(span_id: int, remote: bool = False) -> SpanContext:
        return SpanContext(trace_id, span_id, is_remote=remote, trace_flags=flags, trace_state=state)

    out = []
    for i, (name, span_id, parent_id, start, end, attrs, error) in enumerate([root, *children]):
        if i == 0:
            parent = context(remote_parent, remote=True) if remote_parent else None
        else:
            parent = context(parent_id)
        out.append(ReadableSpan(name, context=context(span_id), parent=parent, resource=resource,
                                attributes=attrs, kind=SpanKind.SERVER if i == 0 else SpanKind.INTERNAL,
                                status=Status(StatusCode.ERROR) if error else Status(StatusCode.UNSET),
                                start_time=start, end_time=end, instrumentation_scope=scope))
    return out


def main() -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    # A Ctrl-C or a SIGTERM to the process group (systemd's default, `kill -- -PGID`) reaches the server too, which
    # sends what it has queued and closes the pipe: this process ends at that end of input, with every span exported.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = json.loads(sys.argv[1])
    exporter = OTLPSpanExporter(endpoint=config["endpoint"], timeout=config["timeout"])
    resource = Resource.create({"service.name": config["service_name"]})
    scope = InstrumentationScope("llmstack.serve")
    pipe, out = sys.stdin.buffer, sys.stdout
    while True:
        head = pipe.read(4)
        if len(head) < 4:
            break
        kind, payload = pickle.loads(pipe.read(struct.unpack(">I", head)[0]))
        if kind == "spans":
            exporter.export([s for record in payload for s in _spans(record, resource, scope)])
        else:
            out.write(f"{payload}\n")
            out.flush()
    exporter.shutdown()


if __name__ == "__main__":
    main()
