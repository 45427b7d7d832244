"""OpenTelemetry traces of generation requests (`serve.tracing`), exported over OTLP/HTTP by the SDK.

One SERVER span per generation request, named `POST <route>` (HTTP semantic conventions), opened by the key gate so
it covers the whole request — a stream's included, since the gate returns when the last byte went out — and continuing
the client's W3C `traceparent`. Its children, in order: auth (the key gate), limits (requests/min, concurrency),
parse (body caps, schema), input_rails (the rails and the render), limits.tokens (context, tokens/min), queue (the
engine slot), engine (time to first token and decode as attributes), output_rails, audit. When the request ends the
span takes the audit line's model, token counts and status (GenAI semantic conventions) and the key's id — never the
key, and no prompt or completion text unless `include_text` (then the text as it left the rails).

The SDK's BatchSpanProcessor only appends a finished span to a queue; its own thread batches and exports, so a slow or
absent collector delays spans, never requests. Off (no otlp_endpoint), every hook here is a no-op context.
"""

from __future__ import annotations

import contextlib
import time

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmstack.config.serve import TracingOptions

# The routes traced, with their GenAI operation name (gen_ai.operation.name).
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion", "/v1/responses": "chat",
              "/v1/messages": "chat"}
_PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent / tracestate only: no vendor headers are read


class Tracing:
    """The tracer of one server (its own TracerProvider, not the global one: two apps in a process trace apart)."""

    def __init__(self, opts: TracingOptions | None = None):
        self.opts = opts or TracingOptions()
        self.enabled = self.opts.otlp_endpoint is not None
        self.provider = None
        if self.enabled:
            # Sampled on the trace id alone, not ParentBased: a client's sampled flag must not force an export.
            self.provider = TracerProvider(resource=Resource.create({"service.name": self.opts.service_name}),
                                           sampler=TraceIdRatioBased(self.opts.sample_ratio))
            exporter = OTLPSpanExporter(endpoint=self.opts.otlp_endpoint, timeout=self.opts.export_timeout_s)
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
            self.tracer = self.provider.get_tracer("llmstack.serve")

    @contextlib.contextmanager
    def request(self, scope: dict, status: dict):
        """The request span around the key gate and the app, for POSTs to a generation route; `status["code"]` is the
        response status when the app returns, and scope["state"]["audit"] the audit line serving.generate filled."""
        path = scope["path"]
        if not self.enabled or scope.get("method") != "POST" or path not in OPERATIONS:
            yield
            return
        carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        attrs = {"http.request.method": "POST", "http.route": path, "url.path": path, "url.scheme": scope["scheme"],
                 "gen_ai.operation.name": OPERATIONS[path]}
        with self.tracer.start_as_current_span(f"POST {path}", context=_PROPAGATOR.extract(carrier),
                                               kind=SpanKind.SERVER, attributes=attrs, record_exception=False,
                                               set_status_on_exception=False) as span:
            try:
                yield
            finally:
                if span.is_recording():
                    self._settle(span, status["code"], scope.get("state", {}))

    @staticmethod
    def _settle(span, code: int, state: dict) -> None:
        span.set_attribute("http.response.status_code", code)
        if code >= 500:  # HTTP server spans: only 5xx is the server's error
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", str(code))
        if state.get("key") is not None:
            span.set_attribute("llmstack.key.id", state["key"].id)
        audit = state.get("audit")
        if not audit:
            return
        names = {"request_id": "llmstack.request.id", "model": "gen_ai.request.model",
                 "served_by": "gen_ai.response.model", "prompt_tokens": "gen_ai.usage.input_tokens",
                 "completion_tokens": "gen_ai.usage.output_tokens", "status": "llmstack.status",
                 "arm": "llmstack.route.arm"}
        for field, name in names.items():
            if audit.get(field) is not None:
                span.set_attribute(name, audit[field])
        if "served_by" not in audit and audit.get("model"):
            span.set_attribute("gen_ai.response.model", audit["model"])

    @contextlib.contextmanager
    def span(self, name: str):
        """A child of the current span (the request's), made current for what runs inside; an APIError leaving it is
        recorded as its error.type (a refusal), a server failure as an error status."""
        if not self.enabled:
            yield None
            return
        with self.tracer.start_as_current_span(name, record_exception=False, set_status_on_exception=False) as sp:
            try:
                yield sp
            except Exception as exc:
                status = getattr(exc, "status", 500)
                sp.set_attribute("error.type", getattr(exc, "code", None) or str(status))
                if status >= 500:
                    sp.set_status(Status(StatusCode.ERROR))
                raise

    @contextlib.asynccontextmanager
    async def queued(self, slot):
        """`slot` (Server.slot()) entered under a `queue` span that ends once the engine slot is held."""
        with self.span("queue"):
            await slot.__aenter__()
        try:
            yield
        finally:
            await slot.__aexit__(None, None, None)

    def engine_span(self):
        """The `engine` span, started here and ended by `end_engine` (a stream's spans its generator, which is not
        a `with` block the context can be attached across); None when off."""
        return self.tracer.start_span("engine") if self.enabled else None

    @staticmethod
    def end_engine(span, ttft: float | None, t0: float, n_out: int, rails_s: float | None = None) -> None:
        """Time to first token (gen_ai.server.time_to_first_token, seconds from the request's arrival) and the decode
        time after it; a stream's output rails run between its deltas, their total is `llmstack.output_rails_s`."""
        if span is None:
            return
        if ttft is not None:
            span.set_attribute("gen_ai.server.time_to_first_token", round(ttft, 6))
            span.set_attribute("llmstack.decode_s", round(max(0.0, time.perf_counter() - t0 - ttft), 6))
        span.set_attribute("gen_ai.usage.output_tokens", n_out)
        if rails_s is not None:
            span.set_attribute("llmstack.output_rails_s", round(rails_s, 6))
        span.end()

    def text(self, prompt: str | None, completion) -> None:
        """With include_text, the prompt and completion as they left the rails, on the current (request) span."""
        if not (self.enabled and self.opts.include_text):
            return
        span = trace.get_current_span()
        if span.is_recording():
            if prompt is not None:
                span.set_attribute("llmstack.prompt", prompt)
            if completion is not None:
                span.set_attribute("llmstack.completion", [c or "" for c in completion])

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout) and stop the export thread."""
        if self.provider is not None:
            self.provider.shutdown()


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
