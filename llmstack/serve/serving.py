"""The request path shared by every generation endpoint, after the key gate (app.py) let a request in, modelled on
vLLM's `entrypoints/openai/` (one `serving_*.py` per endpoint over shared plumbing):

requests/min (429) -> parse (400) -> the endpoint's own checks (tools) -> model allowlist (404/403) -> canary/shadow
pick -> caps (400) -> input rails + render (400 / redact) -> context, tokens/min and spend budget (400 / 429) -> engine
slot (bounded queue: 503) -> `ServedRequest.complete` (JSON) or `.stream` (SSE), each through the output rails ->
audit + metrics; when the request ends, however it ends, its budget reservation is settled to what it used.

An `Endpoint` (serving_chat.py, serving_completion.py, serving_responses.py, serving_messages.py) says what differs:
its request schema, how its prompt is rendered, how its answer and stream chunks are shaped. An endpoint with a wire
of its own (Responses, Anthropic's Messages) translates its request into chat's (`translate`, or its own schema and
render) and chat's answer back (`respond`, `events`).
"""

from __future__ import annotations

import time

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from llmstack.config.serve import KeyEntry, RequestCaps
from llmstack.serve.admission import admit_budget, admit_request, admit_tokens, check_model, read_json
from llmstack.serve.engines import GenParams
from llmstack.serve.protocol import APIError
from llmstack.serve.reasoning import Thinking
from llmstack.serve.request import Answer, ServedRequest
from llmstack.serve.shadow import start_shadow
from llmstack.serve.state import Server, new_request_id
from llmstack.serve.tooling import ToolPlan


class Endpoint:
    """What one OpenAI generation endpoint adds to the shared path. Subclasses set the class attributes and implement
    `render`, `user_text`, `choice` and `delta`; the other hooks default to a plain text endpoint. An endpoint of
    another API served over the chat path reshapes its answer in `respond` and `events`."""

    route: str  # e.g. /v1/completions
    id_prefix: str  # the response id's prefix (cmpl-...)
    schema: type[BaseModel]  # the request body
    object: str  # the response's `object`
    chunk_object: str  # a stream chunk's `object`
    prompt_param: str  # the request field a prompt that does not fit is blamed on
    logprobs_param: str  # the request field that asks for top logprobs
    max_tokens_param = "max_tokens"  # the request field that caps the answer's tokens
    opens_with_role = False  # a stream's first delta per choice is the assistant role

    async def translate(self, srv: Server, key: KeyEntry, req):
        """The request as the schema the rest of the path reads: an endpoint with a wire of its own (Responses)
        returns the internal chat request here, so every guard below is the one chat goes through."""
        return req

    async def respond(self, call: ServedRequest, body):
        """The JSON answer in the endpoint's own shape (`body` is what `ServedRequest.complete` returned: a dict, or
        the response itself when the client went away)."""
        return body

    def events(self, call: ServedRequest, lines):
        """The stream in the endpoint's own shape (`lines`: the server-sent events `ServedRequest.stream` yields)."""
        return lines

    async def prepare(self, srv: Server, req) -> ToolPlan | None:
        """Checks of the endpoint's own fields, before the model is looked up; the tools the request offers."""
        return None

    async def structured(self, srv: Server, req, plan: ToolPlan | None) -> tuple[dict | None, bool]:
        """The JSON Schema the answer is decoded under (or None), and whether it must be a JSON object."""
        return None, False

    def max_tokens(self, req) -> int | None:
        return req.max_tokens

    def top_logprobs(self, req) -> int | None:
        """None: no logprobs; k: each token's logprob and the top k alternatives."""
        return req.logprobs

    def echo(self, req) -> bool:
        return False

    def thinking(self, srv: Server, req, key: KeyEntry, params: GenParams, structured: bool) -> Thinking | None:
        """What the request asks of a reasoning model's thinking (llmstack.serve.reasoning); None: no thinking."""
        return None

    def render(self, srv: Server, req, guard, plan: ToolPlan | None,
               thinking: Thinking | None = None) -> tuple[list[int], str]:
        """The prompt tokens and text, every text of the request through `guard(text, param)` (the input rails)."""
        raise NotImplementedError

    def user_text(self, req) -> str:
        """What the end user wrote (the last user turn, or the prompt): the text drift is measured on."""
        raise NotImplementedError

    def settle(self, call: ServedRequest, answer: Answer) -> None:
        """The whole answer, before its choices are built (completions' echo adjusts it here)."""

    def choice(self, call: ServedRequest, i: int, text: str, rows: list[dict], reason: str, blocked: bool,
               answer: Answer) -> dict:
        """Choice `i` of a JSON response: `text` and logprobs `rows` as the output rails let them out."""
        raise NotImplementedError

    def delta(self, index: int, text: str | None, finish: str | None, lp: list[dict] | None, role: bool,
              calls: list[dict] | None, reasoning: str | None = None) -> dict:
        """One choice of a stream chunk (`reasoning`: a piece of a reasoning model's thinking)."""
        raise NotImplementedError



def gen_params(req, endpoint: Endpoint, caps: RequestCaps, spec_json: dict | None, json_object: bool) -> GenParams:
    max_tokens = endpoint.max_tokens(req)
    if max_tokens is None:
        max_tokens = caps.default_max_tokens
    echo = endpoint.echo(req)
    if echo and req.stream:
        raise APIError(400, "echo is not supported with stream=true; send stream=false to get the prompt back",
                       param="echo")
    if max_tokens == 0 and not echo:
        raise APIError(400, "max_tokens 0 generates nothing: it is only allowed with echo=true (to score the prompt)",
                       param="max_tokens")
    if max_tokens > caps.max_tokens:
        raise APIError(400, f"{endpoint.max_tokens_param} is {max_tokens}; this server allows at most "
                       f"{caps.max_tokens}", param=endpoint.max_tokens_param, code="max_tokens_exceeded")
    if req.n > caps.max_n:
        raise APIError(400, f"n is {req.n}; this server allows at most {caps.max_n}", param="n")
    stops = req.stops()
    if len(stops) > caps.max_stop:
        raise APIError(400, f"at most {caps.max_stop} stop sequences", param="stop")
    if any(len(s) > caps.max_stop_chars for s in stops):
        raise APIError(400, f"a stop sequence may have at most {caps.max_stop_chars} characters", param="stop")
    k = endpoint.top_logprobs(req)
    if k is not None and k > caps.max_logprobs:
        raise APIError(400, f"at most {caps.max_logprobs} top logprobs", param=endpoint.logprobs_param)
    # echo + max_tokens 0: the engine still takes one step (vLLM needs max_tokens >= 1, as its own server does);
    # the completions endpoint drops that token.
    return GenParams(max_tokens=max(max_tokens, 1), temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                     n=req.n, stop=stops, logprobs=k, prompt_logprobs=k if echo else None, json_schema=spec_json,
                     json_object=json_object, ignore_eos=req.ignore_eos)


def input_guard(srv: Server, audit: dict):
    """`guard(text, param)`: one text of the request through the input rails — redacted, or the request refused with
    the blocking rail's own 400; `guard.joined(texts, param)`: several texts through the injection rail as one."""
    def guard(text: str, param: str) -> str:
        v = srv.input_rails.check(text)
        audit["guard"] += v.decisions
        if v.blocked:
            srv.metrics.guard_blocks.labels(f"input:{v.blocked}").inc()
            raise APIError(400, v.message, param=param, code=v.code)
        return v.text

    def joined(texts: list[str], param: str) -> None:  # several texts as one (an injection split across messages)
        v = srv.input_rails.check_joined(texts)
        audit["guard"] += [d for d in v.decisions if d not in audit["guard"]]
        if v.blocked:
            srv.metrics.guard_blocks.labels(f"input:{v.blocked}").inc()
            raise APIError(400, v.message, param=param, code=v.code)
    guard.joined = joined
    return guard


async def generate(request: Request, srv: Server, endpoint: Endpoint):
    """Limits before work: the request is counted against its key's budget and concurrency before its body is read,
    so refused requests cost their sender too; then parse, checks, rails and tokens (in worker threads), then the
    token budget, then the engine."""
    t0 = time.perf_counter()
    key: KeyEntry = request.state.key
    rid = new_request_id(endpoint.id_prefix)
    audit = {"request_id": rid, "key_id": key.id, "route": endpoint.route, "guard": []}
    holding = False  # this request holds one of its key's concurrent places (released when it ends)
    charge = None  # its reservation against the key's spend budget (settled when it ends: budget.py)
    handed_over = False  # a stream took over the key place and the engine slot: it releases them itself
    try:
        request.state.audit = audit  # the request's span (tracing.py) takes its model, tokens and status
        with srv.tracing.span("limits"):
            await admit_request(srv, key, audit)
            srv.take_key_slot(key)
            holding = True
        with srv.tracing.span("parse"):
            req = await endpoint.translate(srv, key, await read_json(request, srv, endpoint.schema))
        audit["model"] = req.model[:200]
        plan = await endpoint.prepare(srv, req)
        await check_model(srv, key, req.model)
        # ---- canary / shadow: the public name picks a serving version; the response names the version that answered
        public = req.model
        req.model, arm, shadow = srv.router.pick(public, req.user or rid)
        if public in srv.router.names():
            audit.update(served_by=req.model, arm=arm)
            srv.metrics.routed.labels(public, req.model, arm).inc()
        schema, json_object = await endpoint.structured(srv, req, plan)
        params = gen_params(req, endpoint, srv.policy.caps, schema, json_object)
        thinking = endpoint.thinking(srv, req, key, params, schema is not None or json_object)

        # ---- input rails, then the prompt tokens the engine will see (off the event loop)
        with srv.tracing.span("input_rails"):
            prompt_ids, prompt_text = await srv.body_work(endpoint.render, srv, req, input_guard(srv, audit), plan,
                                                          thinking)
        if thinking is not None:
            thinking.settle(prompt_text)
            audit["thinking"] = thinking.policy if thinking.opens else "off"
        n_prompt = len(prompt_ids)
        with srv.tracing.span("limits.tokens"):
            await admit_tokens(srv, key, audit, n_prompt, params, endpoint.prompt_param)
            charge = await admit_budget(srv, key, audit, req.model, public, n_prompt, params)

        srv.metrics.tokens.labels("prompt").inc(n_prompt)
        audit["prompt_tokens"] = n_prompt
        await srv.body_work(srv.traffic.observe, endpoint.user_text(req))  # the traffic served, for drift
        call = ServedRequest(srv=srv, endpoint=endpoint, rid=rid, req=req, params=params, prompt_ids=prompt_ids,
                             prompt_text=prompt_text, audit=audit, t0=t0, key=key, thinking=thinking, charge=charge,
                             plan=plan if plan is not None and plan.mode != "none" else None)
        if call.plan is not None:
            audit["tools_offered"] = len(plan.tools)
            audit["tool_choice"] = plan.mode
        if shadow:
            call.shadow = await start_shadow(srv, shadow, public, rid, prompt_ids, params)
        if req.stream:
            slot = srv.slot()
            with srv.tracing.span("queue"):
                await slot.__aenter__()  # refuse (503) before the 200 of the stream goes out
            call.slot = slot
            handed_over = True
            return ClosingStreamingResponse(endpoint.events(call, call.stream()), call.release,
                                            media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        handed_over = True  # complete() releases in its own finally
        return await endpoint.respond(call, await call.complete(request))
    except APIError as exc:
        if "status" not in audit:
            audit.update(status=exc.status, error=exc.code or exc.message[:200],
                         latency_s=round(time.perf_counter() - t0, 4))
            srv.audit.write(audit)
        raise
    finally:
        if holding and not handed_over:
            srv.release_key_slot(key)
        if charge is not None and not handed_over:  # refused before the engine (a full queue): the reservation back
            with anyio.CancelScope(shield=True):
                await srv.budgets.settle(charge, 0, 0, count=False)


class ClosingStreamingResponse(StreamingResponse):
    """Closes the body generator when the response ends, however it ends, then calls `on_close` (idempotent: frees
    the engine slot and the key's place). After a client disconnect Starlette only cancels the sending task: a
    generator paused at a `yield` would otherwise wait for the garbage collector (its frames sit in a traceback cycle)
    before its `finally` aborts the engine request and frees the slot."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                # a generator closed before its first step never runs its own `finally`: release here too
                await self.on_close()
