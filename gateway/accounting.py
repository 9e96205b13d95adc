"""Every completion request, once it is authenticated, leaves three traces when it ends: metrics, one
usage-ledger row, and one structured log line. `RequestTrace` collects what happened; `Accounting` writes it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from gateway.errors import DeadlineExceeded
from gateway.ledger.records import UsageRecord
from gateway.ledger.writer import LedgerWriter
from gateway.metrics import GatewayMetrics

access_log = logging.getLogger("gateway.access")

CLIENT_CLOSED = 499  # the client went away before the answer was complete (nginx's convention)
# The metrics' model label for a request that named no served model: labels stay bounded by what is served.
UNKNOWN_MODEL = "unknown"


@dataclass
class RequestTrace:
    request_id: str
    model: str
    account_id: str | None
    api_key_id: str | None
    stream: bool
    arrived_wall: float = field(default_factory=time.time)
    arrived: float = field(default_factory=time.perf_counter)
    status: int = 200
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_wait_s: float = 0.0
    first_text_at: float | None = None
    last_text_at: float | None = None
    error: str | None = None
    metric_model: str = UNKNOWN_MODEL  # the served (or custom) model id once resolved; `model` is what was asked
    _itl: list[float] = field(default_factory=list)

    def text_arrived(self) -> None:
        now = time.perf_counter()
        if self.first_text_at is None:
            self.first_text_at = now
        elif self.last_text_at is not None:
            self._itl.append(now - self.last_text_at)
        self.last_text_at = now

    @property
    def billed_prompt_tokens(self) -> int:
        """The prompt counts once the model answered, or when the client's own choice (leaving, its deadline)
        ended a request handed to the model; not when the request failed before the model took it (503, 502)."""
        answered = self.first_text_at is not None or self.finish_reason is not None
        return self.prompt_tokens if answered or self.status in (CLIENT_CLOSED, DeadlineExceeded.status) else 0

    @property
    def time_to_first_token_s(self) -> float | None:
        return None if self.first_text_at is None else self.first_text_at - self.arrived


class Accounting:
    def __init__(self, metrics: GatewayMetrics, ledger: LedgerWriter | None) -> None:
        self.metrics = metrics
        self.ledger = ledger

    def finish(self, trace: RequestTrace) -> None:
        duration = time.perf_counter() - trace.arrived
        ttft = trace.time_to_first_token_s
        m, label, model = self.metrics, trace.metric_model, trace.model
        m.requests.labels(label, str(trace.status), trace.finish_reason or "none").inc()
        m.request_duration.labels(label).observe(duration)
        if ttft is not None:
            m.time_to_first_token.labels(label).observe(ttft)
        itl = m.inter_token_latency.labels(label)
        for gap in trace._itl:
            itl.observe(gap)
        prompt_tokens = trace.billed_prompt_tokens
        m.prompt_tokens.labels(label).inc(prompt_tokens)
        m.completion_tokens.labels(label).inc(trace.completion_tokens)
        ttft_ms = None if ttft is None else round(ttft * 1000, 3)
        if self.ledger is not None:
            self.ledger.record(
                UsageRecord(
                    created_at=trace.arrived_wall,
                    request_id=trace.request_id,
                    account_id=trace.account_id,
                    api_key_id=trace.api_key_id,
                    model=model,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=trace.completion_tokens,
                    finish_reason=trace.finish_reason,
                    status=trace.status,
                    time_to_first_token_ms=ttft_ms,
                    duration_ms=round(duration * 1000, 3),
                )
            )
        access_log.info(
            "completion",
            extra={
                "request_id": trace.request_id,
                "account_id": trace.account_id,
                "api_key_id": trace.api_key_id,
                "model": model,
                "stream": trace.stream,
                "status": trace.status,
                "finish_reason": trace.finish_reason,
                "prompt_tokens": prompt_tokens,
                "completion_tokens": trace.completion_tokens,
                "queue_wait_ms": round(trace.queue_wait_s * 1000, 3),
                "time_to_first_token_ms": ttft_ms,
                "duration_ms": round(duration * 1000, 3),
                "error": trace.error,
            },
        )
