"""The in-flight batching engine: admits requests, steps every active sequence together, streams tokens.

`Engine` is synchronous and single-threaded on purpose: whoever drives it (the Triton generation model's
scheduler thread, a benchmark, a test) calls `submit`, `cancel` and `step` from one thread. Each `step`
runs one forward pass over a ragged batch: one token for every sequence that is decoding, plus prompt
chunks of newly admitted sequences up to the per-step token limit, so a new request starts between two
decode steps without waiting for the others to finish.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cpu_engine.errors import EngineError, EngineOverloaded, RequestTooLarge
from cpu_engine.kv_cache import KVTokenBudget, SequenceKVCache
from cpu_engine.model import LlamaModel, Segment
from cpu_engine.sampling import log_softmax_at
from cpu_engine.sequence import FinishReason, GenerationRequest, Sequence, TokenEvent


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 16  # sequences generating at once
    max_kv_tokens: int = 65536  # cache budget; each sequence reserves prompt + max_new_tokens
    max_num_tokens: int = 512  # tokens per forward step (decode tokens first, then prompt chunks)
    max_queue_size: int = 256  # admitted-but-waiting requests before new ones are refused

    def validate(self) -> None:
        for name in ("max_batch_size", "max_kv_tokens", "max_num_tokens", "max_queue_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_num_tokens < self.max_batch_size:
            raise ValueError("max_num_tokens must be >= max_batch_size (every decoding sequence needs a slot)")


@dataclass
class EngineStats:
    active_sequences: int
    queued_requests: int
    kv_tokens_in_use: int  # tokens actually cached
    kv_tokens_reserved: int
    generated_tokens_total: int


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None


class Engine:
    def __init__(self, model: LlamaModel, limits: EngineLimits | None = None) -> None:
        self.model = model
        self.config = model.config
        self.limits = limits or EngineLimits()
        self.limits.validate()
        self.budget = KVTokenBudget(self.limits.max_kv_tokens)
        self.waiting: deque[GenerationRequest] = deque()
        self.running: dict[str, Sequence] = {}
        self.cancelled: set[str] = set()
        self.generated_tokens_total = 0

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path, limits: EngineLimits | None = None) -> Engine:
        return cls(LlamaModel.from_checkpoint(checkpoint_dir), limits)

    # ---- requests in and out -------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        """Raise ValueError (bad field) or RequestTooLarge (can never fit) for a request."""
        c = self.config
        if not request.prompt_ids:
            raise ValueError("input_ids: the prompt is empty")
        table = request.prompt_table
        rows = 0 if table is None else table.shape[0]
        if table is not None and (table.ndim != 2 or table.shape[1] != c.hidden_size):
            raise ValueError(f"prompt_embedding_table must be [rows, {c.hidden_size}], not {list(table.shape)}")
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= c.vocab_size + rows:
            raise ValueError(
                f"input_ids: token ids must be in [0, {c.vocab_size})"
                + (f", or [{c.vocab_size}, {c.vocab_size + rows}) for the prompt table's rows" if rows else "")
            )
        if request.max_new_tokens < 1:
            raise ValueError(f"request_output_len must be >= 1, got {request.max_new_tokens}")
        if request.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {request.min_tokens}")
        # An end id outside the vocabulary would fail the masking step of every sequence in the batch.
        if any(not 0 <= end_id < c.vocab_size for end_id in request.end_ids):
            raise ValueError(f"end_id: token ids must be in [0, {c.vocab_size}), got {list(request.end_ids)}")
        for name, groups in (("stop_words_list", request.stop_sequences), ("bad_words_list", request.bad_sequences)):
            for ids in groups:
                if not ids or min(ids) < 0 or max(ids) >= c.vocab_size:
                    raise ValueError(f"{name}: token ids must be in [0, {c.vocab_size})")
        request.sampling.validate()
        total = len(request.prompt_ids) + request.max_new_tokens
        if total > c.max_position_embeddings:
            raise RequestTooLarge(
                f"prompt ({len(request.prompt_ids)} tokens) + max new tokens ({request.max_new_tokens}) = {total} "
                f"exceeds the model's context length {c.max_position_embeddings}"
            )
        if total > self.limits.max_kv_tokens:
            raise RequestTooLarge(
                f"prompt ({len(request.prompt_ids)} tokens) + max new tokens ({request.max_new_tokens}) = {total} "
                f"exceeds the engine's KV-cache budget of {self.limits.max_kv_tokens} tokens"
            )

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it starts at the next step that has room for it."""
        self.check(request)
        if request.request_id in self.running or any(r.request_id == request.request_id for r in self.waiting):
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if len(self.waiting) >= self.limits.max_queue_size:
            raise EngineOverloaded(f"the engine's wait queue is full ({self.limits.max_queue_size} requests)")
        self.waiting.append(request)

    def cancel(self, request_id: str) -> bool:
        """Stop a request at the next step (no more compute is spent on it). False if it is unknown."""
        known = request_id in self.running or any(r.request_id == request_id for r in self.waiting)
        if known:
            self.cancelled.add(request_id)
        return known

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def stats(self) -> EngineStats:
        return EngineStats(
            active_sequences=len(self.running),
            queued_requests=len(self.waiting),
            kv_tokens_in_use=sum(s.cache.length for s in self.running.values()),
            kv_tokens_reserved=self.budget.reserved,
            generated_tokens_total=self.generated_tokens_total,
        )

    # ---- one step ------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Advance every active sequence by one forward pass; return what each produced."""
        events = self._apply_cancellations()
        self._admit()
        if not self.running:
            return events
        scheduled = self._schedule()
        # Rows of one adapter side by side: its low-rank products then run once over one slice of the batch.
        scheduled.sort(key=lambda item: (item[0].request.adapter is not None, id(item[0].request.adapter)))
        segments = [
            Segment(seq.cache, tokens, seq.request.adapter, seq.request.prompt_table) for seq, tokens in scheduled
        ]
        # A prompt chunk that does not finish its prompt produces no token, so it needs no logits.
        wants_token = [
            not seq.in_prefill or seq.cache.length + len(tokens) >= len(seq.prompt) for seq, tokens in scheduled
        ]
        logits = self.model.forward(segments, wants_token)
        row = 0
        for (seq, _), wanted in zip(scheduled, wants_token, strict=True):
            if not wanted:
                continue
            events.append(self._advance(seq, logits[row]))
            row += 1
        for event in events:
            if event.finished:
                self._release(event.request_id)
        return events

    def _apply_cancellations(self) -> list[TokenEvent]:
        events = []
        for request_id in self.cancelled:
            if request_id in self.running:
                self._release(request_id)
            else:
                self.waiting = deque(r for r in self.waiting if r.request_id != request_id)
            events.append(TokenEvent(request_id, [], [], FinishReason.CANCELLED))
        self.cancelled.clear()
        return events

    def _admit(self) -> None:
        # Strict arrival order: a large request at the head waits for room rather than being overtaken forever.
        while self.waiting and len(self.running) < self.limits.max_batch_size:
            request = self.waiting[0]
            reserve = len(request.prompt_ids) + request.max_new_tokens
            if not self.budget.can_reserve(reserve):
                break
            self.waiting.popleft()
            # Allocated before the budget is charged: if allocating fails, nothing stays reserved.
            sequence = Sequence(request, self.config.vocab_size, SequenceKVCache(self.config, reserve))
            self.budget.reserve(reserve)
            self.running[request.request_id] = sequence

    def _schedule(self) -> list[tuple[Sequence, npt.NDArray[np.int64]]]:
        decoding = [s for s in self.running.values() if not s.in_prefill]
        prefilling = [s for s in self.running.values() if s.in_prefill]
        room = self.limits.max_num_tokens - len(decoding)
        scheduled = [(s, s.next_input(1)) for s in decoding]
        for seq in prefilling:
            if room <= 0:
                break
            chunk = seq.next_input(room)
            scheduled.append((seq, chunk))
            room -= len(chunk)
        return scheduled

    def _advance(self, seq: Sequence, logits: npt.NDArray[np.float32]) -> TokenEvent:
        request = seq.request
        raw = logits.copy() if request.return_log_probs else logits
        seq.mask(logits)
        token = seq.sampler.choose(logits)
        log_probs = [log_softmax_at(raw, token)] if request.return_log_probs else []
        if seq.is_end_id(token):
            return TokenEvent(request.request_id, [], [], FinishReason.END_ID)
        self.generated_tokens_total += 1
        if log_probs:
            seq.cumulative_log_prob += log_probs[0]
        return TokenEvent(request.request_id, [token], log_probs, seq.append(token))

    def _release(self, request_id: str) -> None:
        seq = self.running.pop(request_id, None)
        if seq is not None:
            self.budget.release(seq.reserved_tokens)

    # ---- convenience ---------------------------------------------------------------------------

    def generate(self, requests: Iterable[GenerationRequest]) -> dict[str, GenerationResult]:
        """Run requests to completion (all submitted at once) and collect their outputs."""
        results: dict[str, GenerationResult] = {}
        requests = list(requests)
        for request in requests:  # all checked before any is queued
            self.check(request)
        try:
            for request in requests:
                self.submit(request)
                results[request.request_id] = GenerationResult()
        except (EngineError, ValueError):
            # A full wait queue or an id used twice: the ones already queued are taken back (none has started),
            # so a refused batch leaves nothing behind.
            self.waiting = deque(r for r in self.waiting if r.request_id not in results)
            raise
        while self.has_work():
            for event in self.step():
                result = results.get(event.request_id)
                if result is None:  # someone else's request, submitted directly
                    continue
                result.token_ids.extend(event.token_ids)
                result.log_probs.extend(event.log_probs)
                if event.finish_reason is not None:
                    result.finish_reason = event.finish_reason
        return results
