"""One generation request that passed admission and the input rails (serving.py builds it): what the engine is asked,
the audit line it fills in, what it holds until it ends (an engine slot, one of its key's concurrent places, its
shadow copy), and the two ways its answer goes out — one JSON body (`complete`) or server-sent events (`stream`) —
both through the output rails (`rails.check`, `rails.stream`, `rails.scrub`). The endpoint shapes choices and chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response

from llmstack.config.serve import KeyEntry
from llmstack.serve import reasoning
from llmstack.serve.engines import EngineRejected, EngineUnavailable, GenParams
from llmstack.serve.protocol import APIError, sse, to_json, usage
from llmstack.serve.rails import Rails
from llmstack.serve.reasoning import Thinking, ThinkSplit
from llmstack.serve.state import Server
from llmstack.serve.tooling import ToolPlan, ToolStream

# The longest a stream runs without giving the event loop a turn (`ServedRequest.stream`).
TURN_EVERY_S = 0.002
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
    splits: list[ThinkSplit] | None = None  # a reasoning model's: each choice's thinking and answer
    reasoning: list[str | None] = field(default_factory=list)  # each choice's thinking as the policy lets it out
    reasoning_tokens: int = 0
    delta_tokens: list[list[tuple[int, int]]] = field(default_factory=list)  # a reasoning model's, per choice:
    # (raw start, tokens) of each delta, which tells the thinking's tokens once the output is split

    @classmethod
    def empty(cls, n: int, thinking: Thinking | None = None) -> Answer:
        return cls([""] * n, [[] for _ in range(n)], [None] * n, reasoning=[None] * n,
                   splits=[ThinkSplit(thinking.opens) for _ in range(n)] if thinking is not None else None,
                   delta_tokens=[[] for _ in range(n)] if thinking is not None else [])


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
    thinking: Thinking | None = None  # a reasoning model's thinking: policy, budget (llmstack.serve.reasoning)
    stopped_by: dict[int, str] = field(default_factory=dict)  # per choice: the stop string that ended it
    charge: Any = None  # budget.Charge: the worst case reserved against the key's spend budget
    answered: bool = False  # the engine sent something: it read the prompt, which is charged

    async def release(self, aborted: bool = False, n_out: int = 0) -> None:
        """Free what the request holds, once, and settle its budget reservation to what it used (`n_out` tokens
        generated, and its prompt once the engine answered: a request it never answered is no usage). An aborted
        request (client gone, engine error) takes its shadow with it: nobody will compare that answer."""
        if self.released:
            return
        self.released = True
        if self.slot is not None:
            await self.slot.__aexit__(None, None, None)
        self.srv.release_key_slot(self.key)
        if aborted and self.shadow is not None and not self.shadow.done():
            self.shadow.cancel()
        if self.charge is not None:
            with anyio.CancelScope(shield=True):  # a cancelled request settles too: never keep a reservation
                await self.srv.budgets.settle(self.charge, len(self.prompt_ids) if self.answered else 0, n_out,
                                              count=self.answered)

    def engine_stream(self):
        """The engine's deltas, under the thinking budget (reasoning.generate): closing it aborts the engine call."""
        return reasoning.generate(self.srv.engine, self.rid, self.prompt_ids, self.params, self.req.model,
                                  self.thinking, self._closing_ids)

    def _closing_ids(self) -> list[int]:
        with self.srv.tokenizer_lock:
            return self.srv.engine.tokenizer(reasoning.CLOSING, add_special_tokens=False)["input_ids"]

    def usage(self, n_out: int, reasoning_tokens: int) -> dict:
        return usage(len(self.prompt_ids), n_out, reasoning_tokens if self.thinking is not None else None)

    # ------------------------------------------------------------------------------------------ one JSON body
    async def _run(self, ans: Answer) -> None:
        async with contextlib.aclosing(self.engine_stream()) as gen:
            async for deltas in gen:
                self.answered = True
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
                    if d.stop_reason:
                        self.stopped_by[d.index] = d.stop_reason
                    if ans.splits is not None:
                        ans.delta_tokens[d.index].append((start, len(d.token_ids)))
        # The whole output split at once (ThinkSplit's split does not depend on how its text was cut); unclosed
        # thinking at the end (a length cut) is all thinking. Its tokens are those of the deltas that began inside it,
        # the closing tag's included, as a stream counts them.
        for i, split in enumerate(ans.splits or []):
            split.feed(ans.texts[i], final=True)
            ans.reasoning_tokens += sum(n for start, n in ans.delta_tokens[i] if split.is_thinking_row(start))

    async def complete(self, request: Request):
        """The whole answer as one JSON body; a client that hangs up first aborts the engine request."""
        srv, req, params, audit, t0 = self.srv, self.req, self.params, self.audit, self.t0
        ans, status = Answer.empty(params.n, self.thinking), 200
        try:
            async with srv.tracing.queued(srv.slot()):
                engine_span = srv.tracing.engine_span()
                task = asyncio.create_task(self._run(ans))
                task.add_done_callback(lambda _: srv.tracing.end_engine(engine_span, ans.ttft, t0, ans.n_out))
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
            await self.release(aborted=status != 200, n_out=ans.n_out)

        self.endpoint.settle(self, ans)
        with srv.tracing.span("output_rails"):
            choices, sent = self._railed(ans)
        self._finish_metrics(ans.n_out, ans.ttft)
        if "arm" in audit:
            srv.metrics.version_latency.labels(req.model, audit["arm"]).observe(time.perf_counter() - t0)
        audit.update(status=200, completion_tokens=ans.n_out, latency_s=round(time.perf_counter() - t0, 4),
                     ttft_s=round(ans.ttft, 4) if ans.ttft else None, finish=[c["finish_reason"] for c in choices])
        if self.thinking is not None:
            audit["reasoning_tokens"] = ans.reasoning_tokens
        shown = ans.reasoning if any(r is not None for r in ans.reasoning) else None
        # what the client got: after the rails
        srv.audit.write(audit, prompt=self.prompt_text, completion=sent, reasoning=shown)
        return {"id": self.rid, "object": self.endpoint.object, "created": int(time.time()), "model": req.model,
                "choices": choices, "usage": self.usage(ans.n_out, ans.reasoning_tokens)}

    def _railed(self, ans: Answer) -> tuple[list[dict], list[str]]:
        """Each choice through the output rails: the endpoint's choices, and the texts the client gets."""
        srv, params, audit = self.srv, self.params, self.audit
        rails, choices, sent = srv.output_rails, [], []
        for i in range(params.n):
            split = ans.splits[i] if ans.splits is not None else None
            raw_rows = ans.lps[i]
            if split is not None:  # a reasoning model: the rails read its answer, and its thinking as policy says
                thought_rows = [r for r in raw_rows if split.is_thinking_row(r[0])]
                raw_rows = split.channel(raw_rows[len(thought_rows):], thinking=False)
                ans.reasoning[i], shown_rows, vt = reasoning.railed_thinking(self.thinking.policy, rails, split,
                                                                             thought_rows)
            v = rails.check(split.content if split is not None else ans.texts[i])
            audit["guard"] += v.decisions
            reason = ans.finish[i] or "length"
            text, rows = v.text, rails.scrub(raw_rows, [(sp.start, sp.end) for sp in v.redacted])
            if split is not None:
                audit["guard"] += [d for d in vt.decisions if d not in audit["guard"]] if vt is not None else []
                rows = shown_rows + rows
                if vt is not None and vt.blocked and not v.blocked:
                    v = vt  # thinking the rails stop stops the choice, as its answer would
            if v.blocked:  # the output rail withholds this choice (as OpenAI/Azure content filters do), logprobs too
                srv.metrics.guard_blocks.labels(f"output:{v.blocked}").inc()
                text, rows, reason = "", [], "content_filter"
                if ans.reasoning:
                    ans.reasoning[i] = None
            sent.append(text)
            choices.append(self.endpoint.choice(self, i, text, rows, reason, bool(v.blocked), ans))
        return choices, sent

    # ------------------------------------------------------------------------------------- server-sent events
    async def stream(self):
        """Server-sent events, each delta through the output rails (`StreamedAnswer.lines`); the slot is held until
        the stream ends, and whatever ends it — the last event, a block, an engine error, the client gone — is
        audited once."""
        srv, rid, req, params, audit, t0 = self.srv, self.rid, self.req, self.params, self.audit, self.t0
        out = StreamedAnswer(self)
        gen = self.engine_stream()
        engine_span, rails_s = srv.tracing.engine_span(), 0.0  # the rails run per delta: their time is summed
        loop = asyncio.get_running_loop()
        turn = loop.time()
        try:
            if self.endpoint.opens_with_role:
                for i in range(params.n):
                    yield out.chunk(i, role=True)
            async for deltas in gen:
                # A turn for the event loop at least every TURN_EVERY_S. When the engine is ahead of this process,
                # vLLM's output queue is never empty and sending does not suspend either (until the socket buffer
                # fills), so nothing else — Starlette's disconnect listener, other requests — would run until this
                # stream ended. (Not a turn per step: that is a pass through the event loop, and a poll of its
                # sockets, per token.)
                self.answered = True
                if loop.time() - turn >= TURN_EVERY_S:
                    await asyncio.sleep(0)
                    turn = loop.time()
                for d in deltas:
                    t_rails = time.perf_counter()
                    lines = list(out.lines(d))
                    rails_s += time.perf_counter() - t_rails
                    for line in lines:
                        yield line
                    if out.done:  # an output rail blocked: the error event went out
                        return
            if out.include_usage:
                yield sse({"id": rid, "object": out.obj, "created": out.created, "model": req.model, "choices": [],
                           "usage": self.usage(out.n_out, out.reasoning_tokens)})
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
                await self.release(aborted=out.status != 200, n_out=out.n_out)
            srv.tracing.end_engine(engine_span, out.ttft, t0, out.n_out, rails_s)
            for r in out.rails:
                audit["guard"] += sorted(r.decisions - set(audit["guard"]))
            self._finish_metrics(out.n_out, out.ttft)
            audit.update(status=out.status, completion_tokens=out.n_out, latency_s=round(time.perf_counter() - t0, 4),
                         ttft_s=round(out.ttft, 4) if out.ttft else None, stream=True)
            if self.thinking is not None:
                audit["reasoning_tokens"] = out.reasoning_tokens
            srv.audit.write(audit, prompt=self.prompt_text, completion=["".join(p) for p in out.sent],
                            reasoning=["".join(p) for p in out.sent_reasoning] if out.thought_rails is not None
                            else None)

    def _finish_metrics(self, n_out: int, ttft: float | None) -> None:
        self.srv.metrics.tokens.labels("completion").inc(n_out)
        if ttft is not None:
            self.srv.metrics.ttft.labels(self.endpoint.route).observe(ttft)


def _error_event(status_code: int, message: str, code: str) -> list[str]:
    return [sse(APIError(status_code, message, code=code).body(), event="error"), "data: [DONE]\n\n"]


class StreamedAnswer:
    """A streamed answer as it goes out: per choice its stream rail, the logprobs rows waiting for their text to be
    released, and what was sent; for a reasoning model also its split, and its thinking's own stream rail (none under
    `hide`: thinking and its rows never go out); the token counts, time to first token and status for the audit line.
    `done` still False when the stream ends means the client went away."""

    def __init__(self, call: ServedRequest):
        n, req = call.params.n, call.req
        self.call, self.created, self.obj = call, int(time.time()), call.endpoint.chunk_object
        self.rails = [call.srv.output_rails.stream() for _ in range(n)]
        self.raw_len = [0] * n
        self.held_rows: list[list[tuple[int, int, dict]]] = [[] for _ in range(n)]
        self.sent: list[list[str]] = [[] for _ in range(n)]  # per choice the parts sent, joined for the audit line
        self.n_out, self.ttft, self.status, self.done = 0, None, 200, False
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.tool_stream = ToolStream(call.plan, n, call.audit) if call.plan is not None else None
        th = call.thinking
        self.splits = [ThinkSplit(th.opens) for _ in range(n)] if th is not None else None
        self.thought_rails = None  # pass: rails with no rail (only the stream's bookkeeping)
        if th is not None and th.opens and th.policy != "hide":
            rails = call.srv.output_rails if th.policy == "rail" else Rails([], "output")
            self.thought_rails = [rails.stream() for _ in range(n)]
        self.held_thought: list[list[tuple[int, int, dict]]] = [[] for _ in range(n)]
        self.thought_done = [False] * n
        self.sent_reasoning: list[list[str]] = [[] for _ in range(n)]
        self.reasoning_tokens = 0

    def chunk(self, index: int, text: str | None = None, finish: str | None = None, lp: list[dict] | None = None,
              role: bool = False, calls: list[dict] | None = None, reasoning: str | None = None) -> str:
        """The event of one choice's delta: `sse` of {id, object, created, model, choices: [delta] (, usage: null)},
        the same text, with the part every chunk of this stream shares encoded once (`_frame`)."""
        head, tail = self._frame
        delta = self.call.endpoint.delta(index, text, finish, lp, role, calls, reasoning=reasoning)
        return head + to_json(delta) + tail

    @functools.cached_property
    def _frame(self) -> tuple[str, str]:
        call = self.call
        head = to_json({"id": call.rid, "object": self.obj, "created": self.created, "model": call.req.model})
        return (f"data: {head[:-1]}, \"choices\": [", "]" + (", \"usage\": null" if self.include_usage else "")
                + "}\n\n")

    def _blocked(self, v) -> Iterator[str]:
        self.status, self.done = 400, True
        self.call.srv.metrics.guard_blocks.labels(f"output:{v.blocked}").inc()
        self.call.audit["guard"] += v.decisions
        yield from _error_event(400, v.message, v.code)

    def lines(self, d) -> Iterator[str]:
        """The events for one engine delta: its text as the choice's rail releases it, with the logprobs rows of the
        released text (scrubbed alike), as content or tool-call deltas — a reasoning model's thinking first, as
        reasoning deltas through a rail of its own; or, when a rail blocks, the error event."""
        call = self.call
        if self.ttft is None and d.token_ids:
            self.ttft = time.perf_counter() - call.t0
        self.n_out += len(d.token_ids)
        i, start = d.index, self.raw_len[d.index]
        final = d.finish_reason is not None
        if d.stop_reason:
            call.stopped_by[i] = d.stop_reason
        self.raw_len[i] += len(d.text)
        rows = [(start, self.raw_len[i], row) for row in d.logprobs or []]
        text = d.text
        if self.splits is not None:
            split = self.splits[i]
            if split.thinking:  # the tokens of the closing tag count as thinking
                self.reasoning_tokens += len(d.token_ids)
            thought, text = split.feed(d.text, final=final)
            thought_rows = []
            if rows:
                n_thought = sum(1 for r in rows if split.is_thinking_row(r[0]))
                thought_rows, rows = rows[:n_thought], split.channel(rows[n_thought:], thinking=False)
            yield from self._thought(i, thought, thought_rows, final)
            if self.done:
                return
        rail = self.rails[i]
        if not text and not final and not rows and not self.held_rows[i] and not rail.pending:
            return  # nothing new and nothing waiting (a reasoning model's answer while it thinks): no event
        self.held_rows[i] += rows
        v = rail.feed(text, final=final)
        if v.blocked:
            yield from self._blocked(v)
            return
        ready = [r for r in self.held_rows[i] if r[1] <= rail.consumed]
        self.held_rows[i] = self.held_rows[i][len(ready):]
        rows = call.srv.output_rails.scrub(ready, rail.redacted)
        self.sent[i].append(v.text)
        if self.tool_stream is not None:
            for kwargs in self.tool_stream.feed(i, v.text, rows, d.finish_reason):
                yield self.chunk(i, **kwargs)
            return
        if v.text or rows:
            yield self.chunk(i, v.text, lp=rows)
        if d.finish_reason:
            yield self.chunk(i, finish=d.finish_reason)

    def _thought(self, i: int, thought: str, rows: list[tuple[int, int, dict]], final: bool) -> list[str]:
        """A piece of choice i's thinking, through its own rail, as a reasoning delta with its logprobs rows; when
        thinking has closed, the rest the rail held. Under `hide` nothing goes out. (A list, not a generator like
        `lines`: it runs on every delta of the thinking and gives at most one event.)"""
        split = self.splits[i]
        if self.thought_rails is None or self.thought_done[i]:
            return []
        closed = final or not split.thinking
        self.held_thought[i] += rows
        if not thought and not closed and not rows:
            return []
        rail = self.thought_rails[i]
        v = rail.feed(thought, final=closed)
        self.thought_done[i] = closed
        if v.blocked:
            return list(self._blocked(v))
        out_rows = []
        if self.held_thought[i]:
            held = split.channel(self.held_thought[i], thinking=True)
            n_ready = len(held) if closed else next((k for k, r in enumerate(held) if r[1] > rail.consumed),
                                                    len(held))
            self.held_thought[i] = self.held_thought[i][n_ready:]
            if self.call.thinking.policy == "rail":
                out_rows = self.call.srv.output_rails.scrub(held[:n_ready], rail.redacted)
            else:
                out_rows = [row for _, _, row in held[:n_ready]]
        self.sent_reasoning[i].append(v.text)
        return [self.chunk(i, reasoning=v.text, lp=out_rows)] if v.text or out_rows else []
