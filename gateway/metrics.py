"""Prometheus metrics, one registry per app so several gateways can live in one process (tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("flywheel_gateway_requests", "Requests by endpoint, served version and status",
                                ["endpoint", "version", "status"], registry=r)
        self.latency = Histogram("flywheel_gateway_request_seconds", "Request latency (whole response)",
                                 ["endpoint", "stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("flywheel_gateway_first_chunk_seconds", "Time to the first streamed chunk",
                                     ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("flywheel_gateway_tokens", "Tokens processed", ["kind", "version"], registry=r)
        self.inflight = Gauge("flywheel_gateway_inflight_requests", "Requests in progress", registry=r)
        self.swaps = Counter("flywheel_gateway_swaps", "Production version switches", registry=r)
        self.swap_failures = Counter("flywheel_gateway_swap_failures", "Adapter loads that failed", registry=r)
        self.swap_seconds = Histogram("flywheel_gateway_swap_seconds", "Load + warm-up + switch time",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.production = Gauge("flywheel_gateway_production_version", "1 for the version production serves",
                                ["version"], registry=r)
        self.loaded = Gauge("flywheel_gateway_loaded_adapters", "Adapters loaded on this replica", registry=r)
        self.cancelled = Counter("flywheel_gateway_cancelled", "Requests whose client hung up before the answer, "
                                 "by stage (waiting for a turn, running)", ["stage"], registry=r)
        self.discarded_tokens = Counter("flywheel_gateway_discarded_tokens",
                                        "Tokens generated for clients that had hung up", registry=r)
        self.sync_errors = Counter("flywheel_gateway_sync_errors", "Store sync attempts that failed", registry=r)

    def bind_admission(self, admission) -> None:
        """Queue gauges read at scrape time (no bookkeeping on the request path)."""
        Gauge("flywheel_gateway_queue_waiting", "Requests waiting for a turn", registry=self.registry
              ).set_function(lambda: admission.waiting)
        Gauge("flywheel_gateway_queue_running", "Requests holding a turn", registry=self.registry
              ).set_function(lambda: admission.running)

    def set_production(self, version: str) -> None:
        self.production.clear()
        self.production.labels(version=version).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
