"""Spend budgets per API key, and the usage report, kept in the rate limits' store (`rate_limits.storage`: redis,
shared by every replica that points at it, or this process's memory).

A request reserves its worst case before the engine runs — prompt + max_tokens x n tokens, the generated ones at the
output price, as tokens/min does — against its key's windows (the calendar UTC day and month), and is refused when
that would pass a limit of the key's `budget`. When it ends, however it ends (answered, streamed and cut off by the
client, failed mid-way, cancelled), `settle` replaces the reservation by what it used: its prompt once the engine
answered anything, and the tokens generated. A reservation is therefore never lost (a key pays at most its worst
case) and never kept (it pays what it used). The settle also adds the request to the usage records: per key, per
model, per UTC day — requests, input tokens, output tokens, cost.

Money is counted in integer nano-USD (1e-9 USD), so reservations and settlements add and subtract exactly. The store
is reached under the rate limiter's outage policy (`rate_limits.on_store_error`, `store_timeout_s`, `store_retry_s`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from llmstack.config.serve import Budget, GuardPolicy, KeyEntry, ModelPrice, Pricing
from llmstack.serve.guard import RateLimitStoreUnavailable

log = logging.getLogger("llmstack.serve")
NANO = 1_000_000_000  # nano-USD per USD
USAGE_TTL_S = 400 * 86400  # usage records are kept about 13 months
MAX_REPORT_DAYS = 400
# the limits of a Budget, in the order the store checks them: (field, window, counter)
LIMITS = (("tokens_per_day", "day", "tokens"), ("usd_per_day", "day", "nusd"),
          ("tokens_per_month", "month", "tokens"), ("usd_per_month", "month", "nusd"))


def cost_nusd(price: ModelPrice, n_in: int, n_out: int) -> int:
    """What `n_in` prompt and `n_out` generated tokens cost, in nano-USD (a price is USD per million tokens)."""
    return round(n_in * price.input_per_million * 1000) + round(n_out * price.output_per_million * 1000)


def usd(nusd: float) -> str:
    return f"{nusd / NANO:.6f}".rstrip("0").rstrip(".") + " USD"


@dataclass
class Window:
    """The calendar UTC day and month a moment falls in, and when each resets."""

    day: str
    month: str
    day_reset: float
    month_reset: float

    @classmethod
    def at(cls, now: float) -> Window:
        t = datetime.fromtimestamp(now, UTC)
        midnight = datetime(t.year, t.month, t.day, tzinfo=UTC) + timedelta(days=1)
        month_start = datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)
        return cls(t.strftime("%Y-%m-%d"), t.strftime("%Y-%m"), midnight.timestamp(), month_start.timestamp())


@dataclass
class Charge:
    """One request's reservation, settled once."""

    key_id: str
    model: str
    window: Window
    price: ModelPrice
    tokens: int  # reserved
    nusd: int  # reserved
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    reserved: bool = True  # False: the store did not confirm it (skipped or timed out: redis may still hold it)
    settled: bool = False


@dataclass
class Refusal:
    """The limit a reservation would pass: its name, the amount already charged in its window, when it resets."""

    limit: str
    used: int
    reset_at: float


# Reserve: every limit is checked and, only if all of them hold, every counter is charged. A Lua script runs in redis
# as one command — no other client's command runs between its reads and its writes — so two replicas reserving at the
# same moment see each other's charge: the check and the charge are one atomic step. The charge's own marker key makes
# it idempotent: a command resent after a lost reply (`_script` retries once on a connection error) charges once.
# KEYS: the day and month counters (hashes: tokens, nusd), the charge's marker. ARGV: tokens, nusd, the four limits
# (-1: none, in LIMITS' order), the day's and the month's TTL, the marker's TTL.
RESERVE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {0, '0'} end
local cost = {ARGV[1], ARGV[2]}
local fields = {'tokens', 'nusd'}
for w = 1, 2 do
  for f = 1, 2 do
    local limit = tonumber(ARGV[2 + (w - 1) * 2 + f])
    if limit >= 0 then
      local used = tonumber(redis.call('HGET', KEYS[w], fields[f]) or '0')
      if used + tonumber(cost[f]) > limit then return {(w - 1) * 2 + f, tostring(used)} end
    end
  end
end
for w = 1, 2 do
  redis.call('HINCRBY', KEYS[w], 'tokens', cost[1])
  redis.call('HINCRBY', KEYS[w], 'nusd', cost[2])
  redis.call('EXPIRE', KEYS[w], ARGV[6 + w])
end
redis.call('SET', KEYS[3], 'reserved', 'EX', ARGV[9])
return {0, '0'}
"""
# Settle: the counters move by what the request used and the day's usage record grows, once per charge. The charge's
# marker says whether redis holds its reservation — also after a reserve whose reply timed out but which ran — so the
# script, not the caller, picks the move: marker `reserved` -> (used - reserved); no marker -> (used); either way the
# marker becomes `settled`, and a settled charge (a resent settle) moves nothing. One script: the marker and the
# increments change together.
# KEYS: the day and month counters, the charge's marker, the day's usage hash. ARGV: the counters' moves if reserved
# (tokens, nusd), if not (tokens, nusd), the usage record's TTL, then pairs of (usage field, increment).
SETTLE = """
local state = redis.call('GET', KEYS[3])
local d = {ARGV[3], ARGV[4]}
if state == 'settled' then return 0 end
if state == 'reserved' then d = {ARGV[1], ARGV[2]} end
redis.call('SET', KEYS[3], 'settled', 'EX', 172800)
for w = 1, 2 do
  redis.call('HINCRBY', KEYS[w], 'tokens', d[1])
  redis.call('HINCRBY', KEYS[w], 'nusd', d[2])
end
if #ARGV > 5 then
  for i = 6, #ARGV, 2 do redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', KEYS[4], ARGV[5])
end
return 1
"""
METRICS = ("requests", "input_tokens", "output_tokens", "nusd")
MARKER_TTL_S = 3 * 86400  # a reservation's marker outlives any request


def _counter(key_id: str, period: str) -> str:
    return f"llmstack:budget:{key_id}:{period}"


def _usage_field(metric: str, key_id: str, model: str) -> str:
    return f"{metric}|{json.dumps([key_id, model])}"


class _RedisBackend:
    def __init__(self, uri: str):
        import redis.asyncio as aioredis
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError

        url = "unix://" + uri.removeprefix("redis+unix://") if uri.startswith("redis+unix://") else uri
        self.client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self.errors, self.reconnect = (RedisError, OSError), RedisConnectionError
        self.reserve_script = self.client.register_script(RESERVE)
        self.settle_script = self.client.register_script(SETTLE)

    async def _script(self, script, keys: list[str], args: list):
        """Run a script, once more on a connection error: a pooled connection that a redis restart closed is replaced,
        not failed (redis-py's own retry does not cover it). Both scripts are idempotent per charge, so a command
        resent after a lost reply counts once."""
        try:
            return await script(keys=keys, args=args)
        except self.reconnect:
            return await script(keys=keys, args=args)

    async def reserve(self, charge_id: str, counters: list[str], tokens: int, nusd: int, limits: list[int],
                      ttls: list[int]) -> tuple[int, int]:
        failed, used = await self._script(self.reserve_script, [*counters, f"llmstack:budget:charge:{charge_id}"],
                                          [tokens, nusd, *limits, *ttls, MARKER_TTL_S])
        return int(failed), int(used)

    async def settle(self, charge: Charge, counters: list[str], tokens: int, nusd: int,
                     usage: tuple[int, int, int, int]) -> None:
        pairs = [x for metric, n in zip(METRICS, usage, strict=True)
                 for x in (_usage_field(metric, charge.key_id, charge.model), n)] if usage[0] else []
        await self._script(self.settle_script, [*counters, f"llmstack:budget:charge:{charge.id}",
                                                f"llmstack:usage:{charge.window.day}"],
                           [tokens - charge.tokens, nusd - charge.nusd, tokens, nusd, USAGE_TTL_S, *pairs])

    async def read(self, days: list[str]) -> dict[str, dict[str, int]]:
        async with self.client.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(f"llmstack:usage:{day}")
            got = await pipe.execute()
        return {day: {k.decode(): int(v) for k, v in fields.items()} for day, fields in zip(days, got, strict=True)}

    async def close(self) -> None:
        await self.client.aclose()


class _MemoryBackend:
    """This process's counters. A reservation's read and write have no `await` between them, so on the one event loop
    no other request's reservation runs in between: atomic within the process (and per replica: not shared)."""

    errors = ()

    def __init__(self):
        self.counters: dict[str, list[int]] = {}  # counter -> [tokens, nusd]
        self.usage: dict[str, dict[str, int]] = {}  # day -> {usage field: n}

    async def reserve(self, charge_id, counters, tokens, nusd, limits, ttls) -> tuple[int, int]:
        values = [self.counters.get(c, [0, 0]) for c in counters]
        for i, limit in enumerate(limits):
            used = values[i // 2][i % 2]
            if limit >= 0 and used + (tokens, nusd)[i % 2] > limit:
                return i + 1, used
        for c in counters:
            got = self.counters.setdefault(c, [0, 0])
            got[0] += tokens
            got[1] += nusd
        return 0, 0

    async def settle(self, charge: Charge, counters, tokens, nusd, usage) -> None:
        if charge.reserved:
            tokens, nusd = tokens - charge.tokens, nusd - charge.nusd
        for c in counters:
            got = self.counters.setdefault(c, [0, 0])
            got[0] += tokens
            got[1] += nusd
        if not usage[0]:
            return
        fields = self.usage.setdefault(charge.window.day, {})
        for metric, n in zip(METRICS, usage, strict=True):
            f = _usage_field(metric, charge.key_id, charge.model)
            fields[f] = fields.get(f, 0) + n

    async def read(self, days: list[str]) -> dict[str, dict[str, int]]:
        return {day: dict(self.usage.get(day, {})) for day in days}

    async def close(self) -> None:
        pass


class BudgetStore:
    """Reserve, settle and report spend per key; `on_store_error` counts a store failure (a metric an alert watches)."""

    def __init__(self, policy: GuardPolicy, prices: Pricing, on_store_error=None, clock=time.time):
        uri = policy.rate_limits.storage
        self.backend = _RedisBackend(uri) if uri.startswith(("redis", "rediss")) else _MemoryBackend()
        self.policy, self.prices, self.clock = policy, prices, clock
        self.on_store_error = on_store_error or (lambda exc: None)
        self._down_until = 0.0

    def budget(self, key: KeyEntry) -> Budget:
        return key.budget if key.budget is not None else self.policy.budget

    def price(self, served: str, public: str) -> ModelPrice:
        return self.prices.models.get(served) or self.prices.models.get(public) or self.prices.default

    @staticmethod
    def limit_value(budget: Budget, name: str) -> int | None:
        """A limit in the store's unit (tokens, nano-USD); None when unset."""
        v = getattr(budget, name)
        return None if v is None else round(v * NANO) if name.startswith("usd") else v

    def never_fits(self, key: KeyEntry, tokens: int, nusd: int) -> str | None:
        """The first limit that the worst case alone passes, said for the client; None when each could fit."""
        budget = self.budget(key)
        for name, _, counter in LIMITS:
            limit = self.limit_value(budget, name)
            need = tokens if counter == "tokens" else nusd
            if limit is not None and need > limit:
                amount = f"{need} tokens" if counter == "tokens" else usd(need)
                return f"up to {amount}, and key '{key.id}' has {name} {getattr(budget, name):g}"
        return None

    async def _store(self, call, fallback, deny: bool = True):
        """`await call()` within rate_limits.store_timeout_s; on a failure count it, skip the store for store_retry_s
        and return `fallback` — or, under `on_store_error: deny` where `deny` applies, raise."""
        cfg = self.policy.rate_limits
        if time.monotonic() >= self._down_until:
            try:
                async with asyncio.timeout(cfg.store_timeout_s):  # (wait_for would start a task per call)
                    return await call()
            except (TimeoutError, OSError, *self.backend.errors) as exc:
                self._down_until = time.monotonic() + cfg.store_retry_s
                self.on_store_error(exc)
        if deny and cfg.on_store_error == "deny":
            raise RateLimitStoreUnavailable(f"the budget store is unavailable (retried every {cfg.store_retry_s:g} s)")
        return fallback

    async def reserve(self, key: KeyEntry, served: str, public: str, n_prompt: int,
                      max_out: int) -> Charge | Refusal:
        """Reserve the worst case (`max_out`: max_tokens x n) against the key's day and month, or say which limit
        it would pass. Under `allow` a store outage admits it unreserved (settled as plain usage later)."""
        now = self.clock()
        w, price = Window.at(now), self.price(served, public)
        tokens, nusd = n_prompt + max_out, cost_nusd(price, n_prompt, max_out)
        budget = self.budget(key)
        limits = [-1 if (v := self.limit_value(budget, name)) is None else v for name, _, _ in LIMITS]
        counters = [_counter(key.id, w.day), _counter(key.id, w.month)]
        ttls = [int(w.day_reset - now) + 2 * 86400, int(w.month_reset - now) + 2 * 86400]
        charge = Charge(key.id, served, w, price, tokens, nusd)
        failed, used = await self._store(lambda: self.backend.reserve(charge.id, counters, tokens, nusd, limits, ttls),
                                         (-1, 0))
        if failed == -1:
            charge.reserved = False
        elif failed:
            name, window, _ = LIMITS[failed - 1]
            return Refusal(name, used, w.day_reset if window == "day" else w.month_reset)
        return charge

    async def settle(self, charge: Charge, n_in: int, n_out: int, count: bool = True) -> None:
        """Replace the reservation by what the request used (once); `count`: add it to the usage records (a request
        refunded before it was handed to the engine is not one)."""
        if charge.settled:
            return
        charge.settled = True
        nusd = cost_nusd(charge.price, n_in, n_out)
        usage = (1, n_in, n_out, nusd) if count else (0, 0, 0, 0)
        w = charge.window
        counters = [_counter(charge.key_id, w.day), _counter(charge.key_id, w.month)]
        if await self._store(lambda: self.backend.settle(charge, counters, n_in + n_out, nusd, usage), False,
                             deny=False) is False:
            log.warning("the budget store missed the settlement of a %s request of key %s (%d + %d tokens)",
                        charge.model, charge.key_id, n_in, n_out)

    async def record(self, key_id: str, model: str, n_in: int, n_out: int) -> None:
        """Usage outside any key's budget (the operator's shadow copies): recorded, never limited."""
        charge = Charge(key_id, model, Window.at(self.clock()), self.price(model, model), 0, 0, reserved=False)
        await self.settle(charge, n_in, n_out)

    async def usage(self, since: date, until: date, key: str | None = None, model: str | None = None) -> list[dict]:
        """The usage records of the UTC days since..until (inclusive), per key and model, oldest first."""
        days = [(since + timedelta(days=i)).isoformat() for i in range((until - since).days + 1)]
        got = await self._store(lambda: self.backend.read(days), None, deny=False)
        if got is None:
            raise RateLimitStoreUnavailable("the budget store is unavailable")
        rows: dict[tuple[str, str, str], dict] = {}
        for day in days:
            for name, n in got[day].items():
                metric, who = name.split("|", 1)
                k, m = json.loads(who)
                if (key is None or k == key) and (model is None or m == model):
                    row = rows.setdefault((day, k, m), {"day": day, "key": k, "model": m, **dict.fromkeys(METRICS, 0)})
                    row[metric] += n
        out = []
        for _, row in sorted(rows.items()):
            if row["requests"]:
                row["cost_usd"] = row.pop("nusd") / NANO
                out.append(row)
        return out

    async def close(self) -> None:
        await self.backend.close()
