"""The audit log: one JSON line per request with who (key id, never the key), what (model, route, token counts),
how long, and what the guard decided; admin actions (route changes) with the admin key's id. Prompts and completions
only when the policy asks for them, and then as the rails left them (redacted).

It must not become the weak point: lines are written by a thread of their own (a slow disk never stalls the event
loop), every string in a line is cut to `max_field_chars` and every list (or object) to `max_items` entries, each cut
saying how much it dropped, and a line still past `max_line_chars` (many long fields) is cut again, harder (down to
16 characters and one entry a field) until it fits; unauthenticated requests, and admin calls refused to a non-admin
key, are written at most `unauthenticated_per_minute` times a minute each (a flood of 401s with long paths is counted,
not stored), and a write that fails (disk full) is counted in `llmstack_audit_failures_total` — an alert rule watches
it — instead of failing the request. The queue between the request path and the writer is bounded too: past it, lines
are counted as dropped.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

log = logging.getLogger("llmstack.serve")


class AuditLog:
    def __init__(self, path: str | Path | None, log_prompts: bool = False, max_field_chars: int = 4000,
                 unauthenticated_per_minute: int = 60, on_failure=None, on_drop=None, max_queue: int = 10_000,
                 clock=time.time, max_items: int = 100, max_line_chars: int = 32_000):
        self.path = Path(path) if path else None
        self.log_prompts = log_prompts
        self.max_field_chars = max_field_chars
        self.max_items = max_items
        self.max_line_chars = max_line_chars
        self.unauthenticated_per_minute = unauthenticated_per_minute
        self.clock = clock  # seconds; the 401 allowance is per clock minute
        self.on_failure = on_failure or (lambda: None)  # metrics hooks (counters), called from the writer thread
        self.on_drop = on_drop or (lambda reason: None)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._windows: dict[str, tuple[int, int]] = {}  # kind -> (minute, lines of that kind written in it)
        self._thread = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._thread = threading.Thread(target=self._writer, name="llmstack-audit", daemon=True)
            self._thread.start()

    def write(self, record: dict, prompt=None, completion=None, reasoning=None) -> None:
        """`reasoning`: a reasoning model's thinking as the client got it (None: none was sent), kept with the
        completion only where prompts are logged."""
        if not self.path:
            return
        record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), **record}
        if self.log_prompts:
            record["prompt"], record["completion"] = prompt, completion
            if reasoning is not None:
                record["reasoning"] = reasoning
        try:
            self._queue.put_nowait(self.bounded(record))
        except queue.Full:
            self.on_drop("queue_full")

    def bounded(self, record: dict) -> dict:
        """The record as written: strings and lists cut (and counted), the whole line under max_line_chars."""
        limit, items = self.max_field_chars, self.max_items
        out = {k: _bounded(v, limit, items) for k, v in record.items()}  # the record's own keys are never dropped
        while len(json.dumps(out, ensure_ascii=False, default=str)) > self.max_line_chars and (limit > 16 or items > 1):
            limit, items = max(16, limit // 4), max(1, items // 4)
            out = {**{k: _bounded(v, limit, items) for k, v in record.items()}, "audit_cut": True}
        return out

    def write_unauthenticated(self, record: dict) -> None:
        """A 401: written while this minute's allowance lasts, counted as dropped after."""
        self.write_sampled("unauthenticated", record)

    def write_sampled(self, kind: str, record: dict) -> None:
        """A line of a kind anyone can cause in bulk (401s, admin calls refused to a non-admin key): written while
        this minute's allowance for the kind lasts, counted as dropped (`{kind}_sampled`) after."""
        minute = int(self.clock() // 60)
        start, written = self._windows.get(kind, (minute, 0))
        if start != minute:
            start, written = minute, 0
        if written >= self.unauthenticated_per_minute:
            self.on_drop(f"{kind}_sampled")
            return
        self._windows[kind] = (start, written + 1)
        self.write(record)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every line handed over so far is on disk (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._thread and self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def _writer(self) -> None:
        while True:
            record = self._queue.get()
            try:
                line = json.dumps(record, ensure_ascii=False, default=str)
                with self.path.open("a") as f:  # one write per line: lines never mix
                    f.write(line + "\n")
            except Exception as exc:  # noqa: BLE001 - disk full, permissions, a vanished folder: count, go on
                log.warning("audit log write failed: %s", exc)
                self.on_failure()
            finally:
                self._queue.task_done()


def _bounded(value, limit: int, items: int = 100):
    """Strings cut to `limit` characters, lists and objects to `items` entries; each cut says how much it dropped."""
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + f"…[{len(value) - limit} more characters]"
    if isinstance(value, dict):
        out = {_bounded(str(k), limit, items): _bounded(v, limit, items) for k, v in list(value.items())[:items]}
        if len(value) > items:
            out["…"] = f"[{len(value) - items} more fields]"
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        seq = list(value) if not isinstance(value, (list, tuple)) else value
        out = [_bounded(v, limit, items) for v in seq[:items]]
        if len(seq) > items:
            out.append(f"…[{len(seq) - items} more items]")
        return out
    return value
