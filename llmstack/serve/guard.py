"""The guard in front of the engine: API keys (stored hashed, per-key model allowlist), per-key rate limits
(the `limits` library: in memory, or redis:// shared by replicas), and input/output rails (prompt-injection
heuristics, PII redact/block, blocklist) that also work on streamed text.

The rails are regular expressions written here on purpose: the libraries that do this (presidio, NeMo Guardrails,
llm-guard) pull spaCy or model downloads that a hub-less CPU box cannot have, and a guard that needs a model of its
own to start is not a front door. The patterns are heuristics; the policy decides what each match does. PII is
`llmstack.pii`, the detector data curation uses too, so an endpoint redacts what a curated dataset would. All patterns
run on RE2 (linear time): a backtracking regex on a crafted message could hold a worker for minutes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

import re2

from llmstack.config.serve import GuardPolicy, KeyEntry, KeyFile, Rails
from llmstack.pii import find_pii, redact_spans

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
class StoreUnavailable(Exception):
    """The rate-limit storage cannot be reached and the policy says deny (`rate_limits.on_store_error`)."""


class RateLimiter:
    """Requests/min and tokens/min per key. Tokens are reserved up front (prompt + max_tokens), as OpenAI does,
    so a burst of long generations cannot overrun the budget before the first one finishes.

    A shared storage (redis) that fails or hangs must not fail or stall requests: each call waits at most
    `store_timeout_s`, a failure is counted (`on_store_error` callback: a metric an alert watches) and for
    `store_retry_s` the storage is skipped, so during an outage requests do not each wait the timeout. Meanwhile
    `on_store_error: allow` serves without limits, `deny` raises StoreUnavailable (the API's 503)."""

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
        cls = {"moving-window": strategies.MovingWindowRateLimiter,
               "fixed-window": strategies.FixedWindowRateLimiter,
               "sliding-window-counter": strategies.SlidingWindowCounterRateLimiter}[cfg.strategy]
        self.limiter = cls(self.storage)
        self.defaults = cfg
        self._parse = parse

    def _limits(self, entry: KeyEntry):
        rpm = entry.requests_per_minute or self.defaults.requests_per_minute
        tpm = entry.tokens_per_minute or self.defaults.tokens_per_minute
        return self._parse(f"{rpm}/minute"), self._parse(f"{tpm}/minute")

    async def _store(self, call, fallback):
        """`await call()` within the timeout; on a storage failure: count it, skip the storage for a while, and
        return `fallback` (allow) or raise StoreUnavailable (deny)."""
        import asyncio

        from limits.errors import StorageError

        cfg = self.defaults
        if time.monotonic() >= self._down_until:
            try:
                return await asyncio.wait_for(call(), cfg.store_timeout_s)
            except (StorageError, asyncio.TimeoutError, OSError) as exc:
                self._down_until = time.monotonic() + cfg.store_retry_s
                self.on_store_error(getattr(exc, "storage_error", None) or exc)  # redis's own error
        if cfg.on_store_error == "deny":
            raise StoreUnavailable(f"the rate-limit storage is unavailable (retried every {cfg.store_retry_s:g} s)")
        return fallback

    async def admit_request(self, entry: KeyEntry) -> float | None:
        """Count one request against the key's requests/min, before any work is done for it (a refused request
        counts too: refusing is work). None if admitted, else seconds until retry."""
        rpm, _ = self._limits(entry)
        if not await self._store(lambda: self.limiter.hit(rpm, "rpm", entry.id), True):
            return await self._retry_after(rpm, entry.id, "rpm")
        return None

    async def admit_tokens(self, entry: KeyEntry, tokens: int) -> float | None:
        """Reserve prompt + max_tokens x n against the key's tokens/min. None if admitted (and charged), else seconds
        until retry. A request larger than the whole budget can never fit: `never_fits` says so (a 400, not a 429
        that a client would retry forever)."""
        _, tpm = self._limits(entry)
        if not await self._store(lambda: self.limiter.hit(tpm, "tpm", entry.id, cost=tokens), True):
            return await self._retry_after(tpm, entry.id, "tpm")
        return None

    def never_fits(self, entry: KeyEntry, tokens: int) -> int | None:
        """The key's tokens/min when `tokens` exceeds it, else None."""
        _, tpm = self._limits(entry)
        return tpm.amount if tokens > tpm.amount else None

    async def _retry_after(self, item, key_id: str, kind: str) -> float:
        stats = await self._store(lambda: self.limiter.get_window_stats(item, kind, key_id), None)
        return max(1.0, stats.reset_time - time.time()) if stats else 1.0


# ------------------------------------------------------------------------------------------------------ rails
INJECTION_PATTERNS = [
    (r"\b(ignore|disregard|forget|override)\b.{0,40}\b(previous|prior|above|earlier|all|your|system)\b.{0,20}"
     r"\b(instructions?|prompts?|rules|directions|guidelines)\b"),
    r"\b(reveal|print|show|repeat|leak)\b.{0,30}\b(system prompt|hidden instructions|initial prompt)\b",
    r"\byou are now\b.{0,40}\b(DAN|jailbroken|unrestricted|unfiltered|developer mode)\b",
    r"\b(enable|enter|activate)\b.{0,20}\b(developer|god|jailbreak|DAN) mode\b",
    r"\bdo anything now\b",
    r"<\|im_start\|>\s*system",  # a chat-template role marker smuggled into content
]


def _injection_regex(pattern: str):
    options = re2.Options()
    options.never_capture, options.log_errors = True, False  # a match is all we need
    return re2.compile(("(?is)" + pattern).encode(), options)


_INJECTION = [_injection_regex(p) for p in INJECTION_PATTERNS]


def _injection(text: str) -> bool:
    data = text.encode("utf-8", "surrogatepass")  # a JSON body may carry a lone surrogate
    return any(p.search(data) for p in _INJECTION)


@dataclass
class Verdict:
    text: str  # the text to use (redacted if the policy redacts)
    blocked: str | None = None  # reason code when the text must not pass: injection | pii | blocklist
    decisions: list[str] = field(default_factory=list)  # e.g. ["pii:redact:EMAIL", "injection:flag"]


def check_text(text: str, rails: Rails) -> Verdict:
    v = Verdict(text)
    if rails.injection != "off" and _injection(text):
        v.decisions.append(f"injection:{rails.injection}")
        if rails.injection == "block":
            v.blocked = "injection"
            return v
    if rails.blocklist:
        low = text.lower()
        hit = next((w for w in rails.blocklist if w.lower() in low), None)
        if hit is not None:
            v.decisions.append("blocklist:block")
            v.blocked = "blocklist"
            return v
    if rails.pii != "off":
        spans = find_pii(text)
        if spans:
            v.decisions += [f"pii:{rails.pii}:{kind}" for kind in sorted({span.kind for span in spans})]
            if rails.pii == "block":
                v.blocked = "pii"
            elif rails.pii == "redact":
                v.text = redact_spans(text, spans)
    return v


# The tails StreamRail holds back, as the regexes `\S*$` and `[+(]?\d[\d ().-]*$` would find them (their `$` also
# matches before a final newline), but found by walking back from the end: O(tail), where the regexes' search was
# quadratic on a long run of non-space characters. The tails are held whole however long (StreamRail).
def _tail_end(text: str) -> int:
    return len(text) - 1 if text.endswith("\n") else len(text)


def _word_tail(text: str) -> int:
    end = _tail_end(text)
    i = end
    while i > 0 and not text[i - 1].isspace():
        i -= 1
    return end - i


def _digit_tail(text: str) -> int:
    end = _tail_end(text)
    i, first = end, -1  # the run of [\d ().-] that ends the text starts at i; its first digit is at `first`
    while i > 0:
        c = text[i - 1]
        if c.isdecimal():
            first = i - 1
        elif c not in " ().-":
            break
        i -= 1
    if first < 0:
        return 0
    if first == i and i > 0 and text[i - 1] == "+":
        return end - (i - 1)
    if first > i and text[first - 1] == "(":
        return end - (first - 1)
    return end - first


_KEYWORD_TAIL = re2.compile(r"(?i)\b(?:api[_-]?key|secret|token|password)\s*(?:[:=]\s*['\"]?)?\z")


def _keyword_tail(text: str) -> int:
    """A `password = ` (or api_key/secret/token) whose value has not arrived yet: the whole phrase is held, so the
    value is seen with its key (the key=value secret rule needs both)."""
    window = text[-64:]
    m = _KEYWORD_TAIL.search(window)
    return len(window) - m.start() if m else 0


class StreamRail:
    """Output rails over a stream. Text is released as soon as no rule could still change it: a tail that could still
    be (the start of) a match — a word not yet ended, a run of digits, `password = ` waiting for its value, the
    beginning of a blocked phrase — is held however long it grows, so a PII match or blocked phrase split across
    chunks is seen whole before any of it goes out, and plain prose streams with about one word of delay. Only the
    text not yet released is checked again on each chunk, so the rail never loses its place after a redaction (the
    released text is final) and costs time linear in the answer.

    `consumed` is how many raw characters have been released and `redacted` the raw spans (start, end) that went out
    as placeholders: the API uses both to release logprobs rows only for text that has gone out, redacted alike."""

    def __init__(self, rails: Rails, holdback: int):
        self.rails, self.holdback = rails, holdback
        self.pending = ""  # raw text not yet released; it starts at raw offset `consumed`
        self.consumed = 0
        self.redacted: list[tuple[int, int]] = []
        self.decisions: set[str] = set()

    def _tail(self, text: str) -> int:
        tail = 0
        if self.rails.pii != "off":
            tail = max(_word_tail(text), _digit_tail(text), _keyword_tail(text))
        low = text.lower()
        for term in self.rails.blocklist:  # the longest end of the text that could begin a blocked term
            term = term.lower()
            tail = max([tail] + [k for k in range(1, len(term)) if low.endswith(term[:k])])
        if self.rails.injection != "off":
            tail = max(tail, self.holdback)  # phrase heuristics have no cheap prefix test: hold a window
        return min(tail, len(text))

    def feed(self, chunk: str, final: bool = False) -> Verdict:
        """Returns the next text that may be sent (maybe ""), or a blocked verdict."""
        text = self.pending + chunk
        v = check_text(text, self.rails)
        self.decisions.update(v.decisions)
        if v.blocked:
            return v
        spans = find_pii(text) if self.rails.pii != "off" else []
        cut = len(text) if final else len(text) - self._tail(text)
        for span in spans:  # never cut through a match
            if span.start < cut < span.end:
                cut = span.start
        released = [sp for sp in spans if sp.end <= cut]
        out = text[:cut]
        if self.rails.pii == "redact" and released:
            out = redact_spans(out, released)
            self.redacted += [(self.consumed + sp.start, self.consumed + sp.end) for sp in released]
        self.consumed += cut
        self.pending = text[cut:]
        return Verdict(out, decisions=v.decisions)
