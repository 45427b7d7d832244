"""Server state: what every request of this replica shares — the engine, the policy and the rails it builds, the key
ring and rate limiter, the router, metrics and audit log — with the engine's bounded queue (`slot`), each key's
concurrent places, and the LoRA adapters this replica loads to match the routes store (`sync_adapters`)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio

from llmstack.config.serve import GuardPolicy, KeyEntry, Route, ServeSpec
from llmstack.serve.audit import AuditLog
from llmstack.serve.engines import EngineRejected, EngineUnavailable
from llmstack.serve.guard import KeyRing, RateLimiter
from llmstack.serve.metrics import ServeMetrics
from llmstack.serve.protocol import APIError
from llmstack.serve.rails import Rails
from llmstack.serve.reasoning import parser_for
from llmstack.serve.routing import Router
from llmstack.serve.tracing import Tracing

log = logging.getLogger("llmstack.serve")

# The size of the body the current request's task read (admission.read_json sets it; outside a request it is
# unknown, so work goes to a thread). Its work inline is well under a millisecond at this size.
INLINE_BODY_BYTES = 4096
_body_bytes: contextvars.ContextVar[int | None] = contextvars.ContextVar("llmstack_body_bytes", default=None)


def set_body_bytes(n: int | None) -> None:
    """The size the current request's body work grows with; None: unknown (e.g. a stored history joins it)."""
    _body_bytes.set(n)


@dataclass
class Server:
    engine: Any
    spec: ServeSpec
    policy: GuardPolicy
    keyring: KeyRing
    limiter: RateLimiter
    metrics: ServeMetrics
    audit: AuditLog
    router: Router = field(default_factory=Router)
    traffic: Any = None  # llmstack.monitor.TrafficProfile: binned counts of live prompts (never the text)
    drift_reference: Any = None  # the training data's profile, when serve.drift_reference is set
    responses: Any = None  # responses_store.ResponseStore: the Responses API's stored responses
    budgets: Any = None  # budget.BudgetStore: spend budgets per key and the usage records
    tracing: Tracing = field(default_factory=Tracing)  # OpenTelemetry spans (tracing.py); off unless configured
    background: set = field(default_factory=set)  # shadow generations in flight (kept referenced until done)
    slots: asyncio.Semaphore = field(init=False)
    waiting: int = 0
    in_flight_by_key: dict = field(default_factory=dict)  # key id -> requests in flight (this replica)
    # Parsing, rails, chat templates and tokenizing run in worker threads, at most this many at once, so the event
    # loop only moves bytes: a flood of large bodies queues here instead of stalling every other client.
    workers: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(4))
    # One tokenizer call at a time: a fast tokenizer's settings (split_special_tokens, truncation) are shared state
    # that a call may change, and two worker threads must not see each other's.
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)

    # LoRA adapters loaded at runtime (`llmstack adapters load`): kept in the routes store so every replica serves
    # the same ones; this replica's share of that (see sync_adapters)
    runtime_adapters: set = field(default_factory=set)  # names this replica loaded at runtime (not from server.yaml)
    adapter_errors: dict = field(default_factory=dict)  # name -> (folder, why, when) this replica could not load it
    adapter_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one adapter change at a time per replica

    shadow_budget: KeyEntry = field(init=False)
    input_rails: Rails = field(init=False)  # the policy's rails, built once: serving calls only check/stream/scrub
    output_rails: Rails = field(init=False)

    def __post_init__(self):
        self.slots = asyncio.Semaphore(self.spec.max_concurrency)
        self.input_rails = Rails.from_config(self.policy.input, "input")
        self.output_rails = Rails.from_config(self.policy.output, "output")
        self._max_prompt_chars: int | None = None
        # shadow copies are the operator's traffic: charged to a budget of their own, never to the client's key
        self.shadow_budget = KeyEntry(id="shadow-budget", sha256="0" * 64,
                                      tokens_per_minute=self.policy.rate_limits.shadow_tokens_per_minute)

    @property
    def reasoning_parser(self) -> str | None:
        """How this model's output splits into thinking and answer (llmstack.serve.reasoning); None: it does not."""
        if not hasattr(self, "_reasoning_parser"):
            self._reasoning_parser = parser_for(self.spec.reasoning.parser, self.engine.tokenizer.chat_template)
        return self._reasoning_parser

    def max_prompt_chars(self) -> int:
        """The longest prompt text that could still fit the context: no token is longer than the longest entry of
        the vocabulary (in a byte-level vocabulary every character stands for one byte, so a token's text has at
        most that many characters). A longer text is refused before the tokenizer spends seconds on it."""
        if self._max_prompt_chars is None:
            longest = max(len(t) for t in self.engine.tokenizer.get_vocab())
            self._max_prompt_chars = self.engine.max_model_len * longest
        return self._max_prompt_chars

    def check_prompt_chars(self, text: str, param: str) -> None:
        if len(text) > self.max_prompt_chars():
            raise APIError(400, f"this model's context is {self.engine.max_model_len} tokens, and a prompt of "
                           f"{len(text)} characters cannot fit in it; shorten it", param=param,
                           code="context_length_exceeded")

    async def in_worker(self, fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=self.workers)

    async def body_work(self, fn, *args):
        """CPU work that grows with the request's body (parsing it, checking its schemas, rendering and railing its
        prompt): in a worker thread, so a large body never stalls the event loop, but inline for a body of at most
        INLINE_BODY_BYTES, whose work takes less than handing it to a thread and back would."""
        size = _body_bytes.get()
        if size is not None and size <= INLINE_BODY_BYTES:
            return fn(*args)
        return await self.in_worker(fn, *args)

    def take_key_slot(self, key: KeyEntry) -> None:
        """One of the key's concurrent places (rate_limits.max_concurrent, or the key's own): a key cannot hold
        every engine slot with requests or streams it never finishes reading."""
        cap = key.max_concurrent or self.policy.rate_limits.max_concurrent
        held = self.in_flight_by_key.get(key.id, 0)
        if held >= cap:
            self.metrics.guard_blocks.labels("rate_limit:concurrent").inc()
            raise APIError(429, f"key '{key.id}' already has {held} requests in flight (the limit is {cap}); "
                           "finish reading them or retry shortly", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        self.in_flight_by_key[key.id] = held + 1

    def release_key_slot(self, key: KeyEntry) -> None:
        left = self.in_flight_by_key.get(key.id, 1) - 1
        if left > 0:
            self.in_flight_by_key[key.id] = left
        else:
            self.in_flight_by_key.pop(key.id, None)

    ADAPTER_RETRY_S = 30.0  # a folder that failed to load is tried again after this long (a volume mounted late)

    async def sync_adapters(self, max_age: float | None = None, since: float | None = None) -> None:
        """Make this replica serve the runtime adapters the routes store lists (read at most `max_age` s ago;
        default: the router's refresh): load those missing here, unload those this replica loaded at runtime that the
        store no longer lists (another replica's `adapters unload`). Adapters from server.yaml are never touched. A
        folder this replica cannot load is logged, counted (llmstack_adapter_load_failures_total) and remembered:
        requests for that name get a 503 here, and the load is tried again after ADAPTER_RETRY_S. `since` (a
        time.monotonic()): read the store unless a read began after it — many requests waiting here share one read."""
        if not hasattr(self.engine, "load_adapter"):
            return
        async with self.adapter_lock:
            await self.sync_adapters_locked(max_age if since is None else time.monotonic() - since)

    async def sync_adapters_locked(self, max_age: float | None = None) -> None:  # holding adapter_lock
        wanted = await asyncio.to_thread(self.router.adapters, max_age)  # a store read: off the event loop
        loaded = self.engine.adapters
        for name in [n for n in self.runtime_adapters if n not in wanted or loaded.get(n) != wanted[n]]:
            if name in loaded:
                await self.engine.unload_adapter(name)
            self.runtime_adapters.discard(name)
            log.info("adapter %s unloaded: no longer in the routes store", name)
        for name, path in wanted.items():
            if name in loaded:
                continue  # loaded now, or a server.yaml adapter of that name (which wins here)
            failed = self.adapter_errors.get(name)
            if failed and failed[0] == path and time.monotonic() - failed[2] < self.ADAPTER_RETRY_S:
                continue
            try:
                await self.engine.load_adapter(name, path)
            except (EngineRejected, EngineUnavailable) as exc:
                self.adapter_errors[name] = (path, str(exc)[:300], time.monotonic())
                self.metrics.adapter_load_failures.labels(name).inc()
                log.warning("adapter %s from the routes store could not be loaded here: %s", name, exc)
                continue
            self.runtime_adapters.add(name)
            self.adapter_errors.pop(name, None)
            log.info("adapter %s loaded from %s (the routes store lists it)", name, path)
        for name in [n for n in self.adapter_errors if n not in wanted]:
            del self.adapter_errors[name]

    def public_names(self) -> list[str]:
        """What clients may ask for: the engine's models and adapters, then route names that are not one of them."""
        return [*self.engine.names, *[r for r in self.router.names()  # a store written by hand: odd names never listed
                                      if r not in self.engine.names and MODEL_NAME.match(r)]]

    @contextlib.asynccontextmanager
    async def slot(self):
        """A place in the engine's bounded queue: past max_queue waiting requests, refuse instead of piling up."""
        if self.slots.locked() and self.waiting >= self.spec.max_queue:
            self.metrics.guard_blocks.labels("queue_full").inc()
            raise APIError(503, "the server is at capacity; retry shortly", code="server_overloaded",
                           headers={"Retry-After": "1"})
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            await asyncio.wait_for(self.slots.acquire(), timeout=self.spec.queue_timeout_s)
        except TimeoutError:
            raise APIError(503, f"waited {self.spec.queue_timeout_s:.0f} s for an engine slot; retry shortly",
                           code="server_overloaded", headers={"Retry-After": "1"}) from None
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.metrics.in_flight.dec()
            self.slots.release()



async def keep_in_sync(srv: Server) -> None:
    """Every refresh_s, off the event loop: read the routes store (another replica's route changes), then load and
    unload runtime adapters as it says (another replica's `llmstack adapters load/unload`). A failing store is
    counted by the router and tried again; nothing here ends the loop."""
    while True:
        await asyncio.sleep(srv.router.refresh_s)
        try:
            await asyncio.to_thread(srv.router.refresh)
            await srv.sync_adapters()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - an engine refusing a load mid-restart: serve what is loaded
            log.warning("routes store sync failed: %s", exc)


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"



MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a served name: adapter or route, as OpenAI model ids go


def check_routes(routes: dict[str, Route], served: list[str]) -> None:
    for name, r in routes.items():
        if not MODEL_NAME.match(name):
            raise ValueError(f"routes.{name[:64]!r}: a route name is 1-64 letters, digits, '.', '_' or '-', starting "
                             "with a letter or digit")
        missing = [m for m in (r.primary, r.canary.model if r.canary else None, r.shadow) if m and m not in served]
        if missing:
            raise ValueError(f"routes.{name}: {', '.join(missing)} is not served here (served: {', '.join(served)})")

