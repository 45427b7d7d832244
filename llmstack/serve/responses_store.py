"""Stored responses of the Responses API (`store: true`): what `GET/DELETE /v1/responses/{id}` read and what
`previous_response_id` rebuilds a conversation from. Kept beside the routes (`serve.routes_store`): a JSON file of
its own next to the routes file, or redis keys under `llmstack:response:` (every replica sees every response); in
memory when no store is configured.

A record is owned by the API key that made it: any other key is told 404, exactly as for an id that never existed,
so ids cannot be probed. Records expire after `ttl_s`, a record over `max_bytes` is not stored, and a key keeps at
most `max_per_key` (the oldest goes first). A chain of previous_response_id is walked with a length cap and a seen
set: a loop or a chain past `max_chain` is a 400, never a hang or a RecursionError.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from llmstack.config.serve import ResponsesOptions
from llmstack.serve.protocol import APIError
from llmstack.serve.routing import FileStore


class ResponseStoreUnavailable(Exception):
    """The store behind the responses cannot be read or written (redis down, a file that cannot be written)."""


class _DictBackend:
    """Records as one dict {id: record}: in memory, or in a JSON file (routing.FileStore: atomic replace under a
    lock file, so replicas sharing the file never lose each other's write).

    The dict keeps insertion order, which is creation order and (one TTL for all) expiry order: expired records are a
    prefix, and a key's oldest record is the first of its own. In memory, an index of each key's ids in that order
    makes a write O(1) amortised; the file is read and rewritten whole on every write anyway."""

    def __init__(self, path: str | None):
        self.file = FileStore(Path(path)) if path else None
        self.memory: dict[str, dict] = {}
        self.owned: dict[str, dict[str, None]] = {}  # owner -> its ids, oldest first (memory only)
        self.lock = threading.Lock()
        self.errors = FileStore.errors if path else ()

    def get(self, rid: str) -> dict | None:
        if self.file is None:
            return self.memory.get(rid)
        return (self.file.load() or {}).get(rid)

    def put(self, record: dict, now: float, max_per_key: int) -> None:
        if self.file is not None:
            return self.file.update(lambda state: _put(state or {}, record, now, max_per_key))
        with self.lock:
            while self.memory:
                oldest = next(iter(self.memory))
                if self.memory[oldest]["expires_at"] > now:
                    break
                self._drop(oldest)
            mine = self.owned.setdefault(record["owner"], {})
            while len(mine) >= max_per_key:
                self._drop(next(iter(mine)))
            self.memory[record["id"]] = record
            mine[record["id"]] = None

    def delete(self, rid: str) -> None:
        if self.file is not None:
            return self.file.update(lambda state: {k: v for k, v in (state or {}).items() if k != rid})
        with self.lock:
            if rid in self.memory:
                self._drop(rid)

    def _drop(self, rid: str) -> None:
        owner = self.memory.pop(rid)["owner"]
        mine = self.owned.get(owner, {})
        mine.pop(rid, None)
        if not mine:
            self.owned.pop(owner, None)


def _put(state: dict, record: dict, now: float, max_per_key: int) -> dict:
    """`record` added to a whole-file state: the expired prefix and the key's oldest records past its cap dropped."""
    for rid in list(state):
        if state[rid]["expires_at"] > now:
            break
        del state[rid]
    mine = [rid for rid, rec in state.items() if rec["owner"] == record["owner"]]
    for rid in mine[:max(0, len(mine) - max_per_key + 1)]:
        del state[rid]
    state[record["id"]] = record
    return state


class _RedisBackend:
    """One redis key per record (expiring with its TTL) and a sorted set of each owner's ids by creation time."""

    def __init__(self, url: str):
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.errors = (redis.RedisError, OSError)

    def get(self, rid: str) -> dict | None:
        raw = self.client.get(f"llmstack:response:{rid}")
        return json.loads(raw) if raw else None

    def put(self, record: dict, ttl_s: float, max_per_key: int) -> None:
        owned = f"llmstack:responses:{record['owner']}"
        pipe = self.client.pipeline()
        pipe.set(f"llmstack:response:{record['id']}", json.dumps(record), px=int(ttl_s * 1000))
        pipe.zadd(owned, {record["id"]: record["created_at"]})
        pipe.zremrangebyscore(owned, "-inf", record["created_at"] - ttl_s)
        pipe.zrange(owned, 0, -max_per_key - 1)
        pipe.expire(owned, int(ttl_s) + 1)
        evicted = pipe.execute()[3]
        if evicted:
            self.client.delete(*[f"llmstack:response:{i.decode()}" for i in evicted])
            self.client.zrem(owned, *evicted)

    def delete(self, rid: str, owner: str) -> None:
        self.client.delete(f"llmstack:response:{rid}")
        self.client.zrem(f"llmstack:responses:{owner}", rid)


class ResponseStore:
    def __init__(self, where: str | None, options: ResponsesOptions, clock: Callable[[], float] = time.time):
        self.options, self.clock = options, clock
        if where and where.startswith(("redis://", "rediss://", "redis+unix://")):
            self.backend = _RedisBackend(where)
        else:
            self.backend = _DictBackend(f"{where}.responses.json" if where else None)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self.backend.errors as exc:
            raise ResponseStoreUnavailable(f"{type(exc).__name__}: {str(exc)[:200]}") from exc

    def get(self, rid: str, owner: str) -> dict | None:
        """The record, or None when it does not exist, expired, or belongs to another key (all alike)."""
        rec = self._call(self.backend.get, rid)
        if rec is None or rec.get("owner") != owner or rec.get("expires_at", 0) <= self.clock():
            return None
        return rec

    def put(self, record: dict) -> bool:
        """Store a record ({id, owner, response, items, previous_response_id}); False when it is over max_bytes."""
        opts, now = self.options, self.clock()
        record = {**record, "created_at": now, "expires_at": now + opts.ttl_s}
        if len(json.dumps(record, ensure_ascii=False).encode()) > opts.max_bytes:
            return False
        if isinstance(self.backend, _RedisBackend):
            self._call(self.backend.put, record, opts.ttl_s, opts.max_per_key)
        else:
            self._call(self.backend.put, record, now, opts.max_per_key)
        return True

    def delete(self, rid: str, owner: str) -> bool:
        if self.get(rid, owner) is None:
            return False
        if isinstance(self.backend, _RedisBackend):
            self._call(self.backend.delete, rid, owner)
        else:
            self._call(self.backend.delete, rid)
        return True

    def history(self, rid: str, owner: str) -> list[dict]:
        """The items of the conversation that ends with response `rid`: each earlier response's input and output
        items, oldest first. 400 when it does not exist (or is not this key's), loops, or is longer than max_chain."""
        chain, seen, cur = [], set(), rid
        while cur is not None:
            if cur in seen:
                raise APIError(400, "previous_response_id: the chain of previous responses loops",
                               param="previous_response_id", code="previous_response_chain_invalid")
            if len(chain) >= self.options.max_chain:
                raise APIError(400, f"previous_response_id: the conversation is more than {self.options.max_chain} "
                               "stored responses long; start a new one with the items as input",
                               param="previous_response_id", code="previous_response_chain_too_long")
            seen.add(cur)
            rec = self.get(cur, owner)
            if rec is None:
                raise APIError(400, f"previous response with id '{rid if cur == rid else cur}' not found",
                               param="previous_response_id", code="previous_response_not_found")
            chain.append(rec)
            cur = rec.get("previous_response_id")
        return [item for rec in reversed(chain) for item in rec["items"]]
