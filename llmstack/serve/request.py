"""One generation request that passed admission and the input rails (serving.py builds it): what the engine is asked,
the audit line it fills in, what it holds until it ends (an engine slot, one of its key's concurrent places, its
shadow copy), and the two ways its answer goes out — one JSON body (`complete`) or server-sent events (`stream`) —
both through the output rails (`rails.check`, `rails.stream`, `rails.scrub`). The endpoint shapes choices and chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response

from llmstack.config.serve import KeyEntry
from llmstack.serve.engines import EngineRejected, EngineUnavailable, GenParams
from llmstack.serve.protocol import APIError, sse, usage
from llmstack.serve.state import Server
from llmstack.serve.tooling import ToolPlan, ToolStream

log = logging.getLogger("llmstack.serve")


@dataclass
class Answer:
    """A whole answer as the engine gave it, before the output rails."""

    texts: list[str]
    lps: list[list[tuple[int, int, dict]]]  # per choice: (raw start, raw end, logprobs row)
    finish: list[str | None]
    prompt_lps: list[dict | None] = field(default_factory=list)  # `echo` with logprobs: the prompt tokens' rows
    n_out: int = 0
    ttft: float | None = None

    @classmethod
    def empty(cls, n: int) -> Answer:
        return cls([""] * n, [[] for _ in range(n)], [None] * n)


@dataclass
class ServedRequest:
    """One request on its way through the engine: built by serving.generate once admission, the input rails and the
    token budget passed it; it owns its audit line from here and frees what it holds (`release`) however it ends."""

    srv: Server
    endpoint: Any  # its serving.Endpoint, which shapes choices and chunks (not imported: the endpoints import this)
    rid: str
    req: Any  # the endpoint's request schema
    params: GenParams
    prompt_ids: list[int]
    prompt_text: str
    audit: dict
    t0: float
    key: KeyEntry
    slot: Any = None  # the engine slot a stream holds (Server.slot(), entered)
    shadow: asyncio.Task | None = None
    released: bool = False
    plan: ToolPlan | None = None  # tools offered to the model (auto / required / named)

    async def release(self, aborted: bool = False) -> None:
        """Free what the request holds, once. An aborted request (client gone, engine error) takes its shadow with
        it: nobody will compare that answer."""
        if self.released:
            return
        self.released = True
        if self.slot is not None:
            await self.slot.__aexit__(None, None, None)
        self.srv.release_key_slot(self.key)
        if aborted and self.shadow is not None and not self.shadow.done():
            self.shadow.cancel()

    # ------------------------------------------------------------------------------------------ one JSON body
    async def _run(self, ans: Answer) -> None:
        async for deltas in self.srv.engine.generate(self.rid, self.prompt_ids, self.params, self.req.model):
            for d in deltas:
                if ans.ttft is None and d.token_ids:
                    ans.ttft = time.perf_counter() - self.t0
                start = len(ans.texts[d.index])
                ans.texts[d.index] += d.text
                ans.n_out += len(d.token_ids)
                ans.lps[d.index] += [(start, len(ans.texts[d.index]), row) for row in d.logprobs or []]
                if d.prompt_logprobs:
                    ans.prompt_lps[:] = d.prompt_logprobs
                ans.finish[d.index] = d.finish_reason or ans.finish[d.index]

    async def complete(self, request: Request):
        """The whole answer as one JSON body; a client that hangs up first aborts the engine request."""
        srv, req, params, audit, t0 = self.srv, self.req, self.params, self.audit, self.t0
        ans, status = Answer.empty(params.n), 200
        try:
            async with srv.slot():
                task = asyncio.create_task(self._run(ans))
                # A client that hangs up before the answer is ready should not keep the engine busy: poll for it.
                while not task.done():
                    await asyncio.wait({task}, timeout=0.25)
                    if not task.done() and await request.is_disconnected():
                        task.cancel()
                        srv.metrics.aborted.inc()
                        audit["guard"].append("client_disconnected")
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                        status = 499
                        return Response(status_code=499)
                task.result()
        except EngineUnavailable as exc:
            status = 503
            raise APIError(503, f"the model engine is unavailable ({exc}); retry shortly", code="engine_unavailable",
                           headers={"Retry-After": "5"}) from None
        except EngineRejected as exc:
            status = 400
            raise APIError(400, str(exc)) from None
        except APIError as exc:
            status = exc.status
            raise
        except Exception as exc:  # noqa: BLE001 - an engine failure is this request's 500, never a dropped connection
            status = 500
            log.exception("engine failed on %s", self.rid)
            raise APIError(500, f"the model engine failed on this request ({type(exc).__name__})",
                           code="engine_error") from None
        finally:
            if status != 200:
                if "arm" in audit:
                    srv.metrics.version_errors.labels(req.model, audit["arm"]).inc()
                audit.update(status=status, latency_s=round(time.perf_counter() - t0, 4), completion_tokens=ans.n_out)
                srv.audit.write(audit, prompt=self.prompt_text)
            await self.release(aborted=status != 200)

        self.endpoint.settle(self, ans)
        rails, choices, sent = srv.output_rails, [], []
        for i in range(params.n):
            v = rails.check(ans.texts[i])
            audit["guard"] += v.decisions
            reason = ans.finish[i] or "length"
            text, rows = v.text, rails.scrub(ans.lps[i], [(sp.start, sp.end) for sp in v.redacted])
            if v.blocked:  # the output rail withholds this choice (as OpenAI/Azure content filters do), logprobs too
                srv.metrics.guard_blocks.labels(f"output:{v.blocked}").inc()
                text, rows, reason = "", [], "content_filter"
            sent.append(text)
            choices.append(self.endpoint.choice(self, i, text, rows, reason, bool(v.blocked), ans))
        self._finish_metrics(ans.n_out, ans.ttft)
        if "arm" in audit:
            srv.metrics.version_latency.labels(req.model, audit["arm"]).observe(time.perf_counter() - t0)
        audit.update(status=200, completion_tokens=ans.n_out, latency_s=round(time.perf_counter() - t0, 4),
                     ttft_s=round(ans.ttft, 4) if ans.ttft else None, finish=[c["finish_reason"] for c in choices])
        srv.audit.write(audit, prompt=self.prompt_text, completion=sent)  # what the client got: after the rails
        return {"id": self.rid, "object": self.endpoint.object, "created": int(time.time()), "model": req.model,
                "choices": choices, "usage": usage(len(self.prompt_ids), ans.n_out)}

    # ------------------------------------------------------------------------------------- server-sent events
    async def stream(self):
        """Server-sent events, each delta through the output rails (`StreamedAnswer.lines`); the slot is held until
        the stream ends, and whatever ends it — the last event, a block, an engine error, the client gone — is
        audited once."""
        srv, rid, req, params, audit, t0 = self.srv, self.rid, self.req, self.params, self.audit, self.t0
        out = StreamedAnswer(self)
        gen = srv.engine.generate(rid, self.prompt_ids, params, req.model)
        try:
            if self.endpoint.opens_with_role:
                for i in range(params.n):
                    yield out.chunk(i, role=True)
            async for deltas in gen:
                # A turn for the event loop per engine step. When the engine is ahead of this process, vLLM's output
                # queue is never empty and sending does not suspend either (until the socket buffer fills), so nothing
                # else — Starlette's disconnect listener, other requests — would run until this stream ended.
                await asyncio.sleep(0)
                for d in deltas:
                    for line in out.lines(d):
                        yield line
                    if out.done:  # an output rail blocked: the error event went out
                        return
            if out.include_usage:
                yield sse({"id": rid, "object": out.obj, "created": out.created, "model": req.model, "choices": [],
                           "usage": usage(len(self.prompt_ids), out.n_out)})
            out.done = True
            yield "data: [DONE]\n\n"
        except EngineUnavailable as exc:
            out.status, out.done = 503, True
            for line in _error_event(503, f"the model engine is unavailable ({exc})", "engine_unavailable"):
                yield line
        except EngineRejected as exc:  # e.g. a schema the structured-output backend cannot compile
            out.status, out.done = 400, True
            for line in _error_event(400, str(exc), "invalid_request"):
                yield line
        except Exception as exc:  # noqa: BLE001 - after the 200 went out, an engine failure is an error event
            out.status, out.done = 500, True
            log.exception("engine failed while streaming %s", rid)
            for line in _error_event(500, f"the model engine failed on this request ({type(exc).__name__})",
                                     "engine_error"):
                yield line
        finally:
            if not out.done:  # the client went away (cancelled, or the generator was closed): closing `gen` aborts
                out.status = 499
                srv.metrics.aborted.inc()
                audit["guard"].append("client_disconnected")
            # Shielded: after a disconnect the task is cancelled, and an unshielded await here would be cancelled too,
            # leaving the engine request running and the slot taken.
            with anyio.CancelScope(shield=True):
                await gen.aclose()
                await self.release(aborted=out.status != 200)
            for r in out.rails:
                audit["guard"] += sorted(r.decisions - set(audit["guard"]))
            self._finish_metrics(out.n_out, out.ttft)
            audit.update(status=out.status, completion_tokens=out.n_out, latency_s=round(time.perf_counter() - t0, 4),
                         ttft_s=round(out.ttft, 4) if out.ttft else None, stream=True)
            srv.audit.write(audit, prompt=self.prompt_text, completion=out.sent)

    def _finish_metrics(self, n_out: int, ttft: float | None) -> None:
        self.srv.metrics.tokens.labels("completion").inc(n_out)
        if ttft is not None:
            self.srv.metrics.ttft.labels(self.endpoint.route).observe(ttft)


def _error_event(status_code: int, message: str, code: str) -> list[str]:
    return [sse(APIError(status_code, message, code=code).body(), event="error"), "data: [DONE]\n\n"]


class StreamedAnswer:
    """A streamed answer as it goes out: per choice its stream rail, the logprobs rows waiting for their text to be
    released, and what was sent; the token count, time to first token and status for the audit line. `done` still
    False when the stream ends means the client went away."""

    def __init__(self, call: ServedRequest):
        n, req = call.params.n, call.req
        self.call, self.created, self.obj = call, int(time.time()), call.endpoint.chunk_object
        self.rails = [call.srv.output_rails.stream() for _ in range(n)]
        self.raw_len = [0] * n
        self.held_rows: list[list[tuple[int, int, dict]]] = [[] for _ in range(n)]
        self.sent = [""] * n
        self.n_out, self.ttft, self.status, self.done = 0, None, 200, False
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.tool_stream = ToolStream(call.plan, n, call.audit) if call.plan is not None else None

    def chunk(self, index: int, text: str | None = None, finish: str | None = None, lp: list[dict] | None = None,
              role: bool = False, calls: list[dict] | None = None) -> str:
        call = self.call
        body = {"id": call.rid, "object": self.obj, "created": self.created, "model": call.req.model,
                "choices": [call.endpoint.delta(index, text, finish, lp, role, calls)]}
        if self.include_usage:
            body["usage"] = None
        return sse(body)

    def lines(self, d) -> Iterator[str]:
        """The events for one engine delta: its text as the choice's rail releases it, with the logprobs rows of the
        released text (scrubbed alike), as content or tool-call deltas; or, when the rail blocks, the error event."""
        call = self.call
        if self.ttft is None and d.token_ids:
            self.ttft = time.perf_counter() - call.t0
        self.n_out += len(d.token_ids)
        i, start = d.index, self.raw_len[d.index]
        self.raw_len[i] += len(d.text)
        self.held_rows[i] += [(start, self.raw_len[i], row) for row in d.logprobs or []]
        rail = self.rails[i]
        v = rail.feed(d.text, final=d.finish_reason is not None)
        if v.blocked:
            self.status, self.done = 400, True
            call.srv.metrics.guard_blocks.labels(f"output:{v.blocked}").inc()
            call.audit["guard"] += v.decisions
            yield from _error_event(400, v.message, v.code)
            return
        ready = [r for r in self.held_rows[i] if r[1] <= rail.consumed]
        self.held_rows[i] = self.held_rows[i][len(ready):]
        rows = call.srv.output_rails.scrub(ready, rail.redacted)
        self.sent[i] += v.text
        if self.tool_stream is not None:
            for kwargs in self.tool_stream.feed(i, v.text, rows, d.finish_reason):
                yield self.chunk(i, **kwargs)
            return
        if v.text or rows:
            yield self.chunk(i, v.text, lp=rows)
        if d.finish_reason:
            yield self.chunk(i, finish=d.finish_reason)
