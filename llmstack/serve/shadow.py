"""Shadow traffic: a copy of a routed request run on the route's shadow version, charged to the operator's own budget
(never to the key's spend budget: its usage is recorded under the shadow budget's id); its answer goes to the audit
log and metrics, never to the client (routing.py picks the versions)."""

from __future__ import annotations

import asyncio
import logging
import time

import anyio

from llmstack.serve.engines import GenParams
from llmstack.serve.guard import RateLimitStoreUnavailable
from llmstack.serve.protocol import APIError
from llmstack.serve.state import Server

log = logging.getLogger("llmstack.serve")


async def start_shadow(srv: Server, model: str, public: str, rid: str, prompt_ids: list[int],
                       params: GenParams) -> asyncio.Task | None:
    """The shadow copy of a request, charged to the operator's shadow budget (rate_limits.shadow_tokens_per_minute):
    a flood of live requests cannot double the engine's load through their shadows. None when the budget is spent."""
    cost = len(prompt_ids) + params.max_tokens * params.n
    try:
        over = await srv.limiter.admit_tokens(srv.shadow_budget, cost) is not None
    except RateLimitStoreUnavailable:
        over = True  # `deny`: no budget can be checked, so no shadow
    if over:
        srv.metrics.guard_blocks.labels("shadow_budget").inc()
        return None
    task = asyncio.create_task(run_shadow(srv, model, public, rid, prompt_ids, params))
    srv.background.add(task)
    task.add_done_callback(srv.background.discard)
    return task


async def run_shadow(srv: Server, model: str, public: str, rid: str, prompt_ids: list[int], params: GenParams) -> None:
    """Run the same request on the shadow version; its answer goes to the audit log (and metrics), never to the
    client. It waits for a free engine slot like any request, and gives up rather than queue past the limit."""
    t0, texts, n_out, status, answered = time.perf_counter(), [""] * params.n, 0, 200, False
    try:
        async with srv.slot():
            async for deltas in srv.engine.generate(rid + "-shadow", prompt_ids, params, model):
                answered = True
                for d in deltas:
                    texts[d.index] += d.text
                    n_out += len(d.token_ids)
    except APIError as exc:
        status = exc.status
    except Exception as exc:  # noqa: BLE001 - a failing shadow must never touch the live request
        log.warning("shadow %s failed: %s", model, exc)
        status = 500
    finally:  # the operator's usage, never the key's budget: recorded under the shadow budget's id, cancelled too
        with anyio.CancelScope(shield=True):
            await srv.budgets.record(srv.shadow_budget.id, model, len(prompt_ids) if answered else 0, n_out)
    latency = time.perf_counter() - t0
    srv.metrics.routed.labels(public, model, "shadow").inc()
    if status == 200:
        srv.metrics.version_latency.labels(model, "shadow").observe(latency)
    else:
        srv.metrics.version_errors.labels(model, "shadow").inc()
    srv.audit.write({"request_id": rid, "shadow": True, "model": public, "served_by": model, "arm": "shadow",
                     "status": status, "completion_tokens": n_out, "latency_s": round(latency, 4)},
                    completion=texts)
