"""The guard in front of the engine: API keys (stored hashed, per-key model allowlist) and per-key rate limits (the
`limits` library: in memory, or redis:// shared by replicas). The rails that check the text of requests and answers
(prompt injection, PII, blocklist) are rails.py.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import time

from llmstack.config.serve import GuardPolicy, KeyEntry, KeyFile

# ------------------------------------------------------------------------------------------------------- keys
KEY_PREFIX = "sk-llmstack-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # Keys are 256-bit random tokens, so a plain sha256 is enough (no password-style slow hash is needed).
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """Authenticates a presented key against the hashed key file; never keeps a raw key."""

    def __init__(self, keys: KeyFile):
        self.entries = keys.keys

    def authenticate(self, presented: str | None) -> KeyEntry | None:
        if not presented:
            return None
        digest = hash_key(presented)
        found = None
        for entry in self.entries:  # compare against every entry in constant time, so timing says nothing
            if hmac.compare_digest(digest, entry.sha256):
                found = entry
        return found

    @staticmethod
    def allows(entry: KeyEntry, model: str) -> bool:
        return "*" in entry.models or model in entry.models


def presented_key(headers) -> str | None:
    auth = headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


# ------------------------------------------------------------------------------------------------ rate limits
class RateLimitStoreUnavailable(Exception):
    """The rate-limit storage cannot be reached and the policy says deny (`rate_limits.on_store_error`)."""


class RateLimiter:
    """Requests/min and tokens/min per key. Tokens are reserved up front (prompt + max_tokens), as OpenAI does,
    so a burst of long generations cannot overrun the budget before the first one finishes.

    A shared storage (redis) that fails or hangs must not fail or stall requests: each call waits at most
    `store_timeout_s`, a failure is counted (`on_store_error` callback: a metric an alert watches) and for
    `store_retry_s` the storage is skipped, so during an outage requests do not each wait the timeout. Meanwhile
    `on_store_error: allow` serves without limits, `deny` raises RateLimitStoreUnavailable (the API's 503)."""

    def __init__(self, policy: GuardPolicy, on_store_error=None):
        from limits import parse
        from limits.aio import strategies
        from limits.storage import storage_from_string

        cfg = policy.rate_limits
        uri = cfg.storage
        options = {"wrap_exceptions": True}  # any storage failure arrives as limits.errors.StorageError
        if uri.startswith(("redis", "rediss")):
            options["implementation"] = "redispy"  # the installed client (coredis is not)
        self.storage = storage_from_string("async+" + uri, **options)
        self.on_store_error = on_store_error or (lambda exc: None)
        self._down_until = 0.0  # monotonic time until which the storage is skipped after a failure
        kinds = {"moving-window": strategies.MovingWindowRateLimiter,
                 "fixed-window": strategies.FixedWindowRateLimiter,
                 "sliding-window-counter": strategies.SlidingWindowCounterRateLimiter}
        self.limiter = kinds[cfg.strategy](self.storage)  # requests/min
        self.token_limiter = kinds[cfg.token_strategy](self.storage)  # tokens/min
        self.defaults = cfg
        self._parse = functools.lru_cache(maxsize=256)(parse)  # a few distinct limits, parsed twice per request

    def _limits(self, entry: KeyEntry):
        rpm = entry.requests_per_minute or self.defaults.requests_per_minute
        tpm = entry.tokens_per_minute or self.defaults.tokens_per_minute
        return self._parse(f"{rpm}/minute"), self._parse(f"{tpm}/minute")

    async def _store(self, call, fallback):
        """`await call()` within the timeout; on a storage failure: count it, skip the storage for a while, and
        return `fallback` (allow) or raise RateLimitStoreUnavailable (deny)."""
        import asyncio

        from limits.errors import StorageError

        cfg = self.defaults
        if time.monotonic() >= self._down_until:
            try:
                async with asyncio.timeout(cfg.store_timeout_s):  # (wait_for would start a task per call)
                    return await call()
            except (TimeoutError, StorageError, OSError) as exc:
                self._down_until = time.monotonic() + cfg.store_retry_s
                self.on_store_error(getattr(exc, "storage_error", None) or exc)  # redis's own error
        if cfg.on_store_error == "deny":
            raise RateLimitStoreUnavailable(f"the rate-limit storage is unavailable (retried every "
                                            f"{cfg.store_retry_s:g} s)")
        return fallback

    async def admit_request(self, entry: KeyEntry) -> float | None:
        """Count one request against the key's requests/min, before any work is done for it (a refused request
        counts too: refusing is work). None if admitted, else seconds until retry."""
        rpm, _ = self._limits(entry)
        if not await self._store(lambda: self.limiter.hit(rpm, "rpm", entry.id), True):
            return await self._retry_after(self.limiter, rpm, entry.id, "rpm")
        return None

    async def admit_tokens(self, entry: KeyEntry, tokens: int) -> float | None:
        """Reserve prompt + max_tokens x n against the key's tokens/min. None if admitted (and charged), else seconds
        until retry. A request larger than the whole budget can never fit: `never_fits` says so (a 400, not a 429
        that a client would retry forever)."""
        _, tpm = self._limits(entry)
        if not await self._store(lambda: self.token_limiter.hit(tpm, "tpm", entry.id, cost=tokens), True):
            return await self._retry_after(self.token_limiter, tpm, entry.id, "tpm")
        return None

    def never_fits(self, entry: KeyEntry, tokens: int) -> int | None:
        """The key's tokens/min when `tokens` exceeds it, else None."""
        _, tpm = self._limits(entry)
        return tpm.amount if tokens > tpm.amount else None

    async def _retry_after(self, limiter, item, key_id: str, kind: str) -> float:
        stats = await self._store(lambda: limiter.get_window_stats(item, kind, key_id), None)
        return max(1.0, stats.reset_time - time.time()) if stats else 1.0
