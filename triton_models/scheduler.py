"""The CPU generation model's scheduler thread: in-flight batching over the engine.

Triton calls `execute()` with new requests; it hands them to this thread and returns at once (decoupled
mode). The thread owns the engine: between forward steps it admits new requests, applies `stop`
requests and client cancellations, then steps every active sequence together and streams each new
token to its own response sender. Nothing here imports Triton: requests arrive as `ScheduledRequest`s
whose callbacks the Triton glue provides, which keeps this testable and the glue thin.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from cpu_engine import Engine, EngineError, FinishReason, GenerationRequest, TokenEvent
from triton_models.lora_cache import LoraCache, LoraCacheError, LoraInput

log = logging.getLogger(__name__)


@dataclass
class ScheduledRequest:
    """A generation request plus how to answer it."""

    generation: GenerationRequest
    client_request_id: str  # the id the client gave Triton; `stop` requests name it
    streaming: bool
    prefix_ids: list[int]  # prompt ids echoed before the output when exclude_input_in_output is false
    send: Callable[[list[int], list[float], float, bool], None]  # (tokens, log_probs, cum_log_prob, final)
    send_error: Callable[[str], None]  # an error response that also ends the request
    is_cancelled: Callable[[], bool]
    lora: LoraInput | None = None  # resolved to an adapter from the LoRA cache when the request starts
    prefix_sent: bool = False
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    cum_log_prob: float = 0.0


@dataclass
class StopRequest:
    client_request_id: str
    acknowledge: Callable[[], None]


@dataclass(frozen=True)
class SchedulerStats:
    active_sequences: int
    queued_requests: int
    kv_tokens_in_use: int
    generated_tokens_total: int
    lora_adapters_cached: int = 0
    lora_loads_total: int = 0
    lora_misses_total: int = 0
    lora_evictions_total: int = 0


class Scheduler:
    def __init__(
        self, engine: Engine, lora_cache: LoraCache, on_step: Callable[[SchedulerStats], None] | None = None
    ) -> None:
        self.engine = engine
        self.lora_cache = lora_cache
        self._inbox: queue.Queue[ScheduledRequest | StopRequest | None] = queue.Queue()
        self._active: dict[str, ScheduledRequest] = {}  # by engine request id
        self._on_step = on_step
        self._thread = threading.Thread(target=self._run, name="cpu-llm-scheduler", daemon=True)
        self._stopping = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: ScheduledRequest | StopRequest) -> None:
        self._inbox.put(item)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout_s)

    # ---- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._admit(block=not self.engine.has_work())
                if self.engine.has_work():
                    self._cancel_abandoned()
                    self._deliver(self.engine.step())
                self._report()
            except Exception:  # a bug must not silently kill the thread and hang every client
                log.exception("scheduler step failed; failing the active requests")
                self._fail_all("internal error in the CPU generation model")
        self._refuse_waiting("the model is shutting down")
        self._fail_all("the model is shutting down")

    def _admit(self, block: bool) -> None:
        item = self._inbox.get() if block else self._get_nowait()
        while item is not None:
            if isinstance(item, StopRequest):
                self._stop(item)
            else:
                self._start(item)
            item = self._get_nowait()

    def _get_nowait(self) -> ScheduledRequest | StopRequest | None:
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _start(self, request: ScheduledRequest) -> None:
        try:
            if request.lora is not None:
                adapter = self.lora_cache.acquire(request.lora)
                request.generation = replace(request.generation, adapter=adapter)
        except (LoraCacheError, ValueError) as error:
            _send_error(request, str(error))
            return
        try:
            self.engine.submit(request.generation)
        except (EngineError, ValueError) as error:
            self._release(request)
            _send_error(request, str(error))
            return
        self._active[request.generation.request_id] = request

    def _retire(self, engine_id: str) -> None:
        """The request is no longer the scheduler's to answer (finished, or ended): its adapter is released."""
        self._release(self._active.pop(engine_id))

    def _release(self, request: ScheduledRequest) -> None:
        if request.lora is not None:
            self.lora_cache.release(request.lora.task_id)

    def _stop(self, stop: StopRequest) -> None:
        for engine_id, request in self._active.items():
            if request.client_request_id == stop.client_request_id:
                self.engine.cancel(engine_id)
        _acknowledge(stop)

    def _cancel_abandoned(self) -> None:
        for engine_id, request in self._active.items():
            if request.is_cancelled():
                self.engine.cancel(engine_id)

    def _deliver(self, events: list[TokenEvent]) -> None:
        for event in events:
            request = self._active.get(event.request_id)
            if request is None:
                continue
            if event.finished:
                self._retire(event.request_id)
            try:
                self._answer(request, event)
            except Exception as error:
                # A response Triton cannot take (the stream is closed, shared memory is exhausted) ends that
                # request alone: the other sequences of the batch go on.
                log.exception("request %s: its response could not be sent; ending it", request.client_request_id)
                if not event.finished:
                    self._retire(event.request_id)
                    self.engine.cancel(event.request_id)
                _send_error(request, f"the response could not be sent: {error}")

    def _answer(self, request: ScheduledRequest, event: TokenEvent) -> None:
        request.cum_log_prob += sum(event.log_probs)
        if request.streaming:
            tokens = event.token_ids
            if not request.prefix_sent:
                tokens, request.prefix_sent = request.prefix_ids + tokens, True
            if tokens or event.finished:
                request.send(tokens, event.log_probs, request.cum_log_prob, event.finished)
            return
        request.tokens.extend(event.token_ids)
        request.log_probs.extend(event.log_probs)
        if event.finished:
            tokens = request.prefix_ids + request.tokens
            request.send(tokens, request.log_probs, request.cum_log_prob, True)
        if event.finish_reason is FinishReason.CANCELLED:
            log.debug("request %s cancelled", request.client_request_id)

    def _refuse_waiting(self, message: str) -> None:
        """What execute() handed over but the thread never took: answered too, or those clients would wait."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, StopRequest):
                _acknowledge(item)
            elif item is not None:  # None: shutdown()'s wake-up
                _send_error(item, message)

    def _fail_all(self, message: str) -> None:
        for engine_id, request in list(self._active.items()):
            self.engine.cancel(engine_id)
            self._release(request)
            _send_error(request, message)
        self._active.clear()
        if self.engine.has_work():
            self.engine.step()  # applies the cancellations and frees their caches

    def _report(self) -> None:
        if self._on_step is None:
            return
        stats = self.engine.stats()
        self._on_step(
            SchedulerStats(
                active_sequences=stats.active_sequences,
                queued_requests=stats.queued_requests,
                kv_tokens_in_use=stats.kv_tokens_in_use,
                generated_tokens_total=stats.generated_tokens_total,
                lora_adapters_cached=self.lora_cache.stats.cached,
                lora_loads_total=self.lora_cache.stats.loads,
                lora_misses_total=self.lora_cache.stats.misses,
                lora_evictions_total=self.lora_cache.stats.evictions,
            )
        )


def _send_error(request: ScheduledRequest, message: str) -> None:
    try:
        request.send_error(message)
    except Exception:
        log.exception("request %s: could not send the error response", request.client_request_id)


def _acknowledge(stop: StopRequest) -> None:
    try:
        stop.acknowledge()
    except Exception:
        log.exception("the stop request for %s could not be acknowledged", stop.client_request_id)
