"""Reaching a Ray cluster: the one check curation's Ray executor (llmstack/data/executors.py) and sharded batch
generation (llmstack/serve/batch.py) make before `ray.init`, which keeps retrying an address nobody listens on for
minutes instead of failing."""

from __future__ import annotations

import socket

START_HINT = "Start one (`ray start --head` on the head node) or fix the address"


def ray_unreachable(address: str) -> str | None:
    """Why nothing answers at a Ray HOST:PORT (or ray://HOST:PORT), in seconds; None when something listens there or
    the address is `auto` (Ray finds the cluster of this node itself)."""
    if address == "auto":
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except (OSError, ValueError) as exc:
        return f"no Ray cluster there ({exc}). {START_HINT}"
    return None
