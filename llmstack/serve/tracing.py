"""OpenTelemetry traces of generation requests (`serve.tracing`), exported over OTLP/HTTP by the SDK's exporter.

One SERVER span per generation request, named `POST <route>` (HTTP semantic conventions), opened by the key gate so
it covers the whole request — a stream's included, since the gate returns when the last byte went out — and continuing
the client's W3C `traceparent` (and `tracestate`). Its children, in order: auth (the key gate), limits (requests/min,
concurrency), parse (body caps, schema), input_rails (the rails and the render), limits.tokens (context, tokens/min),
queue (the engine slot), engine (time to first token and decode as attributes), output_rails, audit. When the request
ends the span takes the audit line's model, token counts and status (GenAI semantic conventions) and the key's id —
never the key, and no prompt or completion text unless `include_text` (then the text as it left the rails).

Written by hand on the request path, on purpose: the SDK's span objects cost ~20 µs each to start and end, and its
OTLP encoding ~100 µs a span, all under the API process's one GIL — at concurrency 32 that alone made requests ~30%
slower. So a request records only what the spans need (ids, names, nanosecond times, attributes) in plain tuples,
and `tracing_export.ExportPipe` ships finished requests to a child process, where the SDK's own `ReadableSpan` and
`OTLPSpanExporter` build and send the spans. The W3C propagator and the SDK's sampler and id generator are used as
they are. A slow or absent collector delays spans (then drops the oldest), never requests. Off (no otlp_endpoint),
every hook here is a no-op.
"""

from __future__ import annotations

import contextlib
import contextvars
import time

from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmstack.config.serve import TracingOptions

# The routes traced, with their GenAI operation name (gen_ai.operation.name).
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion", "/v1/responses": "chat",
              "/v1/messages": "chat"}
_PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent / tracestate only: no vendor headers are read
_IDS = RandomIdGenerator()
# The request being traced and the span id that is the parent of a span started now (a child's, inside its block).
_CURRENT: contextvars.ContextVar[tuple[RequestTrace, int] | None] = contextvars.ContextVar("llmstack_trace",
                                                                                          default=None)


class Span:
    """One span of a request, as recorded: what tracing_export turns into the SDK's ReadableSpan."""

    __slots__ = ("name", "span_id", "parent_id", "start", "end", "attrs", "error")

    def __init__(self, name: str, parent_id: int):
        self.name, self.span_id, self.parent_id = name, _IDS.generate_span_id(), parent_id
        self.start, self.end, self.attrs, self.error = time.time_ns(), None, {}, False

    def set_attribute(self, key: str, value) -> None:
        self.attrs[key] = value

    def finish(self) -> None:
        self.end = time.time_ns()


class RequestTrace:
    """A sampled request: its SERVER span (`root`), the spans under it, and the remote parent it continues."""

    __slots__ = ("trace_id", "remote_parent", "trace_state", "root", "children")

    def __init__(self, trace_id: int, remote_parent: int | None, trace_state: str, root: Span):
        self.trace_id, self.remote_parent, self.trace_state = trace_id, remote_parent, trace_state
        self.root, self.children = root, []

    def record(self) -> tuple:
        """Plain data for the export process; a child still open when the request ends (an engine span whose task
        outlived its client) ends with the request."""
        end = self.root.end
        spans = [(s.name, s.span_id, s.parent_id, s.start, s.end or end, s.attrs, s.error) for s in self.children]
        r = self.root
        return (self.trace_id, self.remote_parent, self.trace_state,
                (r.name, r.span_id, self.remote_parent, r.start, r.end, r.attrs, r.error), spans)


class Tracing:
    """The tracer of one server (its own sampler and export process: two apps in a process trace apart)."""

    def __init__(self, opts: TracingOptions | None = None):
        self.opts = opts or TracingOptions()
        self.enabled = self.opts.otlp_endpoint is not None
        self.pipe = None
        if self.enabled:
            from llmstack.serve.tracing_export import ExportPipe

            # Sampled on the trace id alone, not ParentBased: a client's sampled flag must not force an export.
            self.sampler = TraceIdRatioBased(self.opts.sample_ratio)
            self.pipe = ExportPipe(self.opts)

    @contextlib.contextmanager
    def request(self, scope: dict, status: dict):
        """The request span around the key gate and the app, for POSTs to a generation route; `status["code"]` is the
        response status when the app returns, and scope["state"]["audit"] the audit line serving.generate filled."""
        path = scope["path"]
        if not self.enabled or scope.get("method") != "POST" or path not in OPERATIONS:
            yield
            return
        carrier = {}
        for k, v in scope["headers"]:
            if k in (b"traceparent", b"tracestate"):
                carrier[k.decode("latin-1")] = v.decode("latin-1")
        parent = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context() if carrier else None
        valid = parent is not None and parent.is_valid
        trace_id = parent.trace_id if valid else _IDS.generate_trace_id()
        if not self.sampler.should_sample(None, trace_id, path).decision.is_sampled():
            yield
            return
        root = Span(f"POST {path}", 0)
        root.attrs.update({"http.request.method": "POST", "http.route": path, "url.path": path,
                           "url.scheme": scope["scheme"], "gen_ai.operation.name": OPERATIONS[path]})
        rec = RequestTrace(trace_id, parent.span_id if valid else None,
                           parent.trace_state.to_header() if valid else "", root)
        token = _CURRENT.set((rec, root.span_id))
        try:
            yield
        finally:
            _CURRENT.reset(token)
            self._settle(root, status["code"], scope.get("state", {}))
            root.finish()
            self.pipe.put(rec.record())

    @staticmethod
    def _settle(span: Span, code: int, state: dict) -> None:
        span.attrs["http.response.status_code"] = code
        if code >= 500:  # HTTP server spans: only 5xx is the server's error
            span.error = True
            span.attrs["error.type"] = str(code)
        if state.get("key") is not None:
            span.attrs["llmstack.key.id"] = state["key"].id
        audit = state.get("audit")
        if not audit:
            return
        names = {"request_id": "llmstack.request.id", "model": "gen_ai.request.model",
                 "served_by": "gen_ai.response.model", "prompt_tokens": "gen_ai.usage.input_tokens",
                 "completion_tokens": "gen_ai.usage.output_tokens", "status": "llmstack.status",
                 "arm": "llmstack.route.arm"}
        for field, name in names.items():
            if audit.get(field) is not None:
                span.attrs[name] = audit[field]
        if "served_by" not in audit and audit.get("model"):
            span.attrs["gen_ai.response.model"] = audit["model"]

    @contextlib.contextmanager
    def span(self, name: str):
        """A child of the current span (the request's), current for what runs inside; an APIError leaving it is
        recorded as its error.type (a refusal), a server failure as an error status."""
        current = _CURRENT.get()
        if current is None:
            yield None
            return
        rec, parent_id = current
        sp = Span(name, parent_id)
        rec.children.append(sp)
        token = _CURRENT.set((rec, sp.span_id))
        try:
            yield sp
        except Exception as exc:
            status = getattr(exc, "status", 500)
            sp.attrs["error.type"] = getattr(exc, "code", None) or str(status)
            sp.error = status >= 500
            raise
        finally:
            _CURRENT.reset(token)
            sp.finish()

    @contextlib.asynccontextmanager
    async def queued(self, slot):
        """`slot` (Server.slot()) entered under a `queue` span that ends once the engine slot is held."""
        with self.span("queue"):
            await slot.__aenter__()
        try:
            yield
        finally:
            await slot.__aexit__(None, None, None)

    def engine_span(self) -> Span | None:
        """The `engine` span, started here and ended by `end_engine` (a stream's spans its generator, which is not
        a `with` block); None when off or the request is not sampled."""
        current = _CURRENT.get()
        if current is None:
            return None
        rec, parent_id = current
        sp = Span("engine", parent_id)
        rec.children.append(sp)
        return sp

    @staticmethod
    def end_engine(span: Span | None, ttft: float | None, t0: float, n_out: int, rails_s: float | None = None) -> None:
        """Time to first token (gen_ai.server.time_to_first_token, seconds from the request's arrival) and the decode
        time after it; a stream's output rails run between its deltas, their total is `llmstack.output_rails_s`."""
        if span is None:
            return
        if ttft is not None:
            span.attrs["gen_ai.server.time_to_first_token"] = round(ttft, 6)
            span.attrs["llmstack.decode_s"] = round(max(0.0, time.perf_counter() - t0 - ttft), 6)
        span.attrs["gen_ai.usage.output_tokens"] = n_out
        if rails_s is not None:
            span.attrs["llmstack.output_rails_s"] = round(rails_s, 6)
        span.finish()

    def text(self, prompt: str | None, completion) -> None:
        """With include_text, the prompt and completion as they left the rails, on the request span."""
        current = _CURRENT.get()
        if current is None or not self.opts.include_text:
            return
        root = current[0].root
        if prompt is not None:
            root.attrs["llmstack.prompt"] = prompt
        if completion is not None:
            root.attrs["llmstack.completion"] = [c or "" for c in completion]

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Every finished request's spans exported (or given up on); True when the export process confirmed it."""
        return self.pipe.flush(timeout_s) if self.pipe is not None else True

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout) and stop the export process."""
        if self.pipe is not None:
            self.pipe.shutdown()


class TracedAudit:
    """The audit log with each `write` under an `audit` span (and, with include_text, the text it logs after the
    rails set on the request span); everything else is the AuditLog's."""

    def __init__(self, log, tracing: Tracing):
        self._log, self._tracing = log, tracing

    def write(self, record: dict, prompt=None, completion=None, reasoning=None) -> None:
        self._tracing.text(prompt, completion)
        with self._tracing.span("audit"):
            self._log.write(record, prompt=prompt, completion=completion, reasoning=reasoning)

    def __getattr__(self, name):
        return getattr(self._log, name)
