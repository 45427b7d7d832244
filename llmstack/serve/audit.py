"""The audit log: one JSON line per request with who (key id, never the key), what (model, route, token counts),
how long, and what the guard decided. Raw prompts and completions only when the policy asks for them."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path


class AuditLog:
    def __init__(self, path: str | Path | None, log_prompts: bool = False):
        self.path = Path(path) if path else None
        self.log_prompts = log_prompts
        self._lock = threading.Lock()
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict, prompt=None, completion=None) -> None:
        if not self.path:
            return
        record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), **record}
        if self.log_prompts:
            record["prompt"], record["completion"] = prompt, completion
        line = json.dumps(record, ensure_ascii=False, default=str)
        with self._lock, self.path.open("a") as f:  # one write per line: lines from concurrent requests never mix
            f.write(line + "\n")
