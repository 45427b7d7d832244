"""Prometheus metrics for the API (served at /metrics, behind a key). One registry per app, so several apps in one
process (tests, benchmarks) keep separate counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llmstack_requests", "API requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("llmstack_request_latency_seconds", "request latency (to the last byte)", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llmstack_time_to_first_token_seconds", "time to the first generated token", ["route"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("llmstack_tokens", "tokens processed", ["kind"], registry=r)  # prompt | completion
        self.guard_blocks = Counter("llmstack_guard_blocks", "requests refused by the guard, by reason", ["reason"],
                                    registry=r)
        self.queue_depth = Gauge("llmstack_queue_depth", "requests waiting for an engine slot", registry=r)
        self.in_flight = Gauge("llmstack_in_flight", "requests being generated", registry=r)
        self.aborted = Counter("llmstack_aborted", "generations aborted because the client went away", registry=r)
        self.routed = Counter("llmstack_routed_requests", "requests per public name, serving version and arm",
                              ["name", "model", "arm"], registry=r)  # arm: primary | canary | shadow
        self.version_latency = Histogram("llmstack_version_latency_seconds", "latency by serving version (non-stream)",
                                         ["model", "arm"], buckets=_LATENCY_BUCKETS, registry=r)
        self.version_errors = Counter("llmstack_version_errors", "failed generations by serving version",
                                      ["model", "arm"], registry=r)
        self.drift_psi = Gauge("llmstack_drift_psi", "PSI of live prompts vs the training data, per feature",
                               ["feature"], registry=r)
        self.engine_restarts = Gauge("llmstack_engine_restarts", "times the engine was rebuilt after dying",
                                     registry=r)
        self.audit_failures = Counter("llmstack_audit_failures", "audit lines that could not be written (disk full, "
                                      "permissions)", registry=r)
        self.audit_dropped = Counter("llmstack_audit_dropped", "audit lines not written on purpose: 401s past the "
                                     "per-minute allowance, or a full writer queue", ["reason"], registry=r)
        self.store_errors = Counter("llmstack_store_errors", "failed or timed-out calls to a shared store (redis): "
                                    "rate_limits or routes", ["store"], registry=r)
        self.adapter_load_failures = Counter("llmstack_adapter_load_failures", "runtime adapters the shared store "
                                             "lists that this replica could not load", ["adapter"], registry=r)
