"""The gateway's Prometheus metrics (`GET /metrics`), in one registry per application.

Labels are bounded: model ids, HTTP statuses, finish reasons, replica addresses. Accounts are not labels
(unbounded cardinality): per-account usage lives in the ledger.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets in seconds: first tokens from milliseconds (echo) to minutes (long prompts under load); the gaps
# between tokens from sub-millisecond to seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "gateway_requests", "Completion requests by model, HTTP status and finish reason",
            ["model", "status", "finish_reason"], registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "gateway_time_to_first_token_seconds", "From request arrival to the first text", ["model"],
            buckets=TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "gateway_inter_token_latency_seconds", "Between consecutive pieces of streamed text", ["model"],
            buckets=ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "gateway_request_duration_seconds", "From request arrival to its last byte", ["model"],
            buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds", "Time spent waiting for a concurrency slot", ["model"],
            buckets=QUEUE_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.completion_tokens = Counter("gateway_completion_tokens", "Generated tokens", ["model"], registry=r)
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests holding a slot", ["model"], registry=r)
        self.queued = Gauge("gateway_requests_queued", "Requests waiting for a slot", ["model"], registry=r)
        self.replica_ready = Gauge(
            "gateway_triton_replica_ready", "1 when the replica's ensemble is ready", ["model", "replica"],
            registry=r,
        )  # fmt: skip
        self.replica_in_flight = Gauge(
            "gateway_triton_replica_in_flight", "Streams open on a Triton replica", ["replica"], registry=r
        )
        self.ledger_pending = Gauge("gateway_ledger_pending_rows", "Usage rows not yet written", registry=r)
        self.ledger_rows_written = Counter("gateway_ledger_rows_written", "Usage rows written", registry=r)
        self.ledger_write_failures = Counter(
            "gateway_ledger_write_failures", "Failed usage-ledger batch writes (retried)", registry=r
        )
        self.ledger_dropped = Counter("gateway_ledger_rows_dropped", "Usage rows dropped: queue full", registry=r)
        self.ledger_refused = Counter(
            "gateway_ledger_rows_refused", "Usage rows the database refused (logged in full, not retried)", registry=r
        )
        self.ledger_cpu_seconds = Counter(
            "gateway_ledger_cpu_seconds",
            "CPU time the usage ledger's write path spent in the gateway (queueing, rows, inserts)",
            registry=r,
        )
        self.ledger_write_seconds = Histogram(
            "gateway_ledger_write_seconds", "Time to write one batch of usage rows", registry=r
        )
