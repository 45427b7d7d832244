"""Admission: the checks a generation request passes before any engine work, in the order they cost the server —
the key's requests/min (before the body is read), the body itself (size, time, JSON depth, schema), the model the key
asked for, and the prompt + worst-case completion against the context, the key's tokens/min and its spend budget."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import anyio
from fastapi import Request
from pydantic import BaseModel, ValidationError

from llmstack.config.serve import KeyEntry
from llmstack.serve.budget import Charge, Refusal, cost_nusd, usd
from llmstack.serve.engines import GenParams
from llmstack.serve.guard import KeyRing, RateLimitStoreUnavailable
from llmstack.serve.protocol import APIError, parse_body, validation_message
from llmstack.serve.state import Server, set_body_bytes


def _store_down(exc: RateLimitStoreUnavailable) -> APIError:
    return APIError(503, f"{exc}; the server refuses requests it cannot count (rate_limits.on_store_error: deny). "
                    "Retry shortly", code="rate_limit_store_unavailable", headers={"Retry-After": "5"})


async def admit_request(srv: Server, key: KeyEntry, audit: dict) -> None:
    """One request against the key's requests/min (429), counted before its body is read: refusing is work too."""
    try:
        retry = await srv.limiter.admit_request(key)
    except RateLimitStoreUnavailable as exc:
        raise _store_down(exc) from None
    if retry is not None:
        srv.metrics.guard_blocks.labels("rate_limit:requests_per_minute").inc()
        audit["guard"].append("rate_limit:requests_per_minute")
        raise APIError(429, f"rate limit reached for key '{key.id}' (requests_per_minute); retry in "
                       f"{retry:.0f} s", code="rate_limit_exceeded", headers={"Retry-After": str(int(retry + 0.999))})


async def read_json(request: Request, srv: Server, schema: type[BaseModel]):
    caps = srv.policy.caps
    chunks, size = [], 0
    try:
        with anyio.fail_after(caps.body_timeout_s):  # a body trickled in byte by byte (slowloris) does not hold on
            async for chunk in request.stream():  # chunked bodies have no Content-Length: count while reading
                chunks.append(chunk)
                size += len(chunk)
                if size > caps.max_body_bytes:
                    srv.metrics.guard_blocks.labels("body_too_large").inc()
                    raise APIError(413, f"request body is over the {caps.max_body_bytes}-byte limit",
                                   code="request_too_large")
    except TimeoutError:
        srv.metrics.guard_blocks.labels("body_timeout").inc()
        raise APIError(408, f"the request body did not arrive within {caps.body_timeout_s:.0f} s",
                       code="request_timeout") from None
    set_body_bytes(size)  # the request's later body work runs inline when the body is small (Server.body_work)
    return await srv.body_work(_validated, b"".join(chunks), schema, caps.max_json_depth)


def _validated(body: bytes, schema: type[BaseModel], max_depth: int):
    raw = parse_body(body, max_depth)
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        msg, param = validation_message(exc)
        raise APIError(400, msg, param=param) from None


async def check_model(srv: Server, key: KeyEntry, model: str) -> None:
    """The model is served here (404; an adapter another replica loaded a moment ago is loaded first, one this
    replica could not load is a 503) and this key may use it (403)."""
    served = srv.public_names()
    if model not in served:
        await srv.sync_adapters(since=time.monotonic())  # loaded on another replica a moment ago?
        served = srv.public_names()
    if model not in served and model in srv.adapter_errors and KeyRing.allows(key, model):
        raise APIError(503, f"adapter '{model}' is loaded on other replicas but could not be loaded on this "
                       f"one ({srv.adapter_errors[model][1]}); retry shortly", param="model",
                       code="adapter_unavailable", headers={"Retry-After": "30"})
    if model not in served:
        mine = [m for m in served if KeyRing.allows(key, m)]
        raise APIError(404, f"model '{model[:200]}' does not exist or is not available to this key; this key "
                       f"may use: {', '.join(mine) or 'no model'}", param="model", code="model_not_found")
    if not KeyRing.allows(key, model):
        srv.metrics.guard_blocks.labels("model_not_allowed").inc()
        raise APIError(403, f"this API key may not use model '{model}'", param="model",
                       code="model_not_allowed")


async def admit_tokens(srv: Server, key: KeyEntry, audit: dict, n_prompt: int, params: GenParams,
                       prompt_param: str) -> None:
    """The prompt and the worst-case completion fit the context (400) and the key's tokens/min: a request that can
    never fit its budget is a 400, one that does not fit now a 429; the tokens are reserved up front."""
    context = srv.engine.max_model_len
    if n_prompt + params.max_tokens > context:
        raise APIError(400, f"this model's context is {context} tokens; the prompt has {n_prompt} "
                       f"and max_tokens asks for {params.max_tokens} more. Shorten the prompt or lower max_tokens.",
                       param=prompt_param, code="context_length_exceeded")
    cost = n_prompt + params.max_tokens * params.n
    budget = srv.limiter.never_fits(key, cost)
    if budget is not None:
        raise APIError(400, f"this request needs up to {cost} tokens (prompt {n_prompt} + max_tokens "
                       f"{params.max_tokens} x n {params.n}) and key '{key.id}' may use {budget} a minute: it "
                       "can never be admitted; shorten it or lower max_tokens", code="tokens_exceed_limit")
    try:
        retry = await srv.limiter.admit_tokens(key, cost)
    except RateLimitStoreUnavailable as exc:
        raise _store_down(exc) from None
    if retry is not None:
        srv.metrics.guard_blocks.labels("rate_limit:tokens_per_minute").inc()
        audit["guard"].append("rate_limit:tokens_per_minute")
        raise APIError(429, f"rate limit reached for key '{key.id}' (tokens_per_minute); retry in {retry:.0f} s",
                       code="rate_limit_exceeded", headers={"Retry-After": str(int(retry + 0.999))})


async def admit_budget(srv: Server, key: KeyEntry, audit: dict, served: str, public: str, n_prompt: int,
                       params: GenParams) -> Charge:
    """Reserve the request's worst case (prompt + max_tokens x n, at the served model's prices) against the key's
    spend budget (budget.py): a request that can never fit is a 400, one that does not fit now a 429 that says when
    the window resets. The reservation is settled to what the request used when it ends."""
    budgets, max_out = srv.budgets, params.max_tokens * params.n
    worst = cost_nusd(budgets.price(served, public), n_prompt, max_out)
    too_big = budgets.never_fits(key, n_prompt + max_out, worst)
    if too_big is not None:
        raise APIError(400, f"this request may cost {too_big} (prompt {n_prompt} + max_tokens {params.max_tokens} "
                       f"x n {params.n} tokens): it can never be admitted; shorten it or lower max_tokens",
                       code="budget_exceeds_limit")
    try:
        got = await budgets.reserve(key, served, public, n_prompt, max_out)
    except RateLimitStoreUnavailable as exc:
        raise _store_down(exc) from None
    if isinstance(got, Refusal):
        srv.metrics.guard_blocks.labels("budget").inc()
        audit["guard"].append(f"budget:{got.limit}")
        limit = getattr(budgets.budget(key), got.limit)
        spent = usd(got.used) if got.limit.startswith("usd") else f"{got.used} tokens"
        reset = datetime.fromtimestamp(got.reset_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        retry = max(1, int(got.reset_at - budgets.clock() + 0.999))
        raise APIError(429, f"key '{key.id}' has spent {spent} of its {got.limit} {limit:g}, and this request may "
                       f"cost up to {n_prompt + max_out} tokens ({usd(worst)}); the budget resets at {reset}",
                       code="budget_exceeded", headers={"Retry-After": str(retry)})
    return got
