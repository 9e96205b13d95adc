"""A generation request, its running state, and when it ends."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from cpu_engine.kv_cache import SequenceKVCache
from cpu_engine.lora import LoraAdapter
from cpu_engine.sampling import Sampler, SamplingParams

IntArray = npt.NDArray[np.int64]


class FinishReason(enum.Enum):
    END_ID = "end_id"  # an end-of-sequence token was generated (it is not part of the output)
    STOP_WORDS = "stop_words"  # the output ends with a stop token sequence (kept in the output)
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # stopped by the caller


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    end_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end generation
    bad_sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences that must never be generated
    min_tokens: int = 0  # end ids are masked until this many tokens were generated
    return_log_probs: bool = False
    adapter: LoraAdapter | None = None  # a LoRA adapter on the base model (None: the base model itself)
    # p-tuning, as TensorRT-LLM does it: prompt ids >= vocab_size are rows of this table [rows, hidden]
    # (vocab_size + i is row i), e.g. an image's features in place of its placeholder tokens.
    prompt_table: npt.NDArray[np.float32] | None = None


@dataclass
class TokenEvent:
    """What one step produced for one request: new tokens, and whether it is done."""

    request_id: str
    token_ids: list[int]
    log_probs: list[float]
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Sequence:
    """The engine's state for one admitted request."""

    def __init__(self, request: GenerationRequest, vocab_size: int, cache: SequenceKVCache) -> None:
        self.request = request
        self.prompt = np.asarray(request.prompt_ids, dtype=np.int64)
        self.cache = cache
        # Table rows are not tokens: penalties see only the real ones.
        self.sampler = Sampler(request.sampling, vocab_size, self.prompt[self.prompt < vocab_size])
        self.output: list[int] = []
        self.cumulative_log_prob = 0.0
        self._end_ids = np.asarray(request.end_ids, dtype=np.int64)
        self._single_bad = np.asarray([s[0] for s in request.bad_sequences if len(s) == 1], dtype=np.int64)
        self._multi_bad = [s for s in request.bad_sequences if len(s) > 1]

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt) + self.request.max_new_tokens

    @property
    def prefilled(self) -> int:
        """Prompt tokens already in the cache."""
        return min(self.cache.length, len(self.prompt))

    @property
    def in_prefill(self) -> bool:
        return self.cache.length < len(self.prompt)

    def next_input(self, max_tokens: int) -> IntArray:
        """The tokens this sequence feeds into the next forward step."""
        if self.in_prefill:
            return self.prompt[self.cache.length : self.cache.length + max_tokens]
        return np.asarray(self.output[-1:], dtype=np.int64)

    def mask(self, logits: npt.NDArray[np.float32]) -> None:
        """Forbid what may not come next: bad sequences, and end ids before min_tokens."""
        if self._single_bad.size:
            logits[self._single_bad] = -np.inf
        for bad in self._multi_bad:
            prefix = bad[:-1]
            if len(self.output) >= len(prefix) and tuple(self.output[-len(prefix) :]) == prefix:
                logits[bad[-1]] = -np.inf
        if len(self.output) < self.request.min_tokens and self._end_ids.size:
            logits[self._end_ids] = -np.inf

    def is_end_id(self, token_id: int) -> bool:
        return token_id in self.request.end_ids

    def append(self, token_id: int) -> FinishReason | None:
        """Record a generated (non-end) token; return why generation ends now, if it does."""
        self.output.append(token_id)
        self.sampler.record(token_id)
        for stop in self.request.stop_sequences:
            if len(self.output) >= len(stop) and tuple(self.output[-len(stop) :]) == stop:
                return FinishReason.STOP_WORDS
        if len(self.output) >= self.request.max_new_tokens:
            return FinishReason.LENGTH
        return None
