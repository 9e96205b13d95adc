"""Choosing the next token: penalties, temperature, top-k, top-p, seeded randomness.

Order of operations (the one vLLM and Hugging Face use): banned tokens and min-tokens masking, then
repetition penalty (prompt and output tokens), presence and frequency penalties (output tokens only,
as in OpenAI's API), then temperature, top-k, top-p, and a draw from the remaining distribution.
Temperature 0 is greedy: the highest logit after penalties, no randomness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]

# top-p needs the sorted head of the distribution; sorting this many candidates first (instead of the whole
# vocabulary) covers any p in practice, with a full sort as the fallback when it does not.
_TOP_P_CANDIDATES = 1024
_GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: disabled
    top_p: float = 1.0  # 1.0: disabled
    repetition_penalty: float = 1.0  # 1.0: disabled
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: fresh entropy for every request

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        if not 0.0 <= self.temperature <= 100.0 or not np.isfinite(self.temperature):
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"{name} must be in [-100, 100], got {value}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        # Below _GREEDY_TEMPERATURE the distribution is one-hot anyway, and dividing by the temperature would
        # overflow to inf (then NaN) for temperatures near the float32 minimum.
        return self.temperature < _GREEDY_TEMPERATURE or self.top_k == 1


class Sampler:
    """Per-sequence sampling state: the random generator and the token counts penalties need."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: npt.NDArray[np.int64]) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        needs_counts = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self.output_counts = np.zeros(vocab_size, dtype=np.float32) if needs_counts else None
        self.seen: npt.NDArray[np.bool_] | None = None
        if params.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, dtype=bool)
            self.seen[prompt_ids] = True

    def record(self, token_id: int) -> None:
        if self.output_counts is not None:
            self.output_counts[token_id] += 1
        if self.seen is not None:
            self.seen[token_id] = True

    def choose(self, logits: FloatArray) -> int:
        """Pick the next token from logits [vocab] (already masked); logits may be modified."""
        p = self.params
        if self.seen is not None:
            penalised = logits[self.seen]
            logits[self.seen] = np.where(
                penalised > 0, penalised / p.repetition_penalty, penalised * p.repetition_penalty
            )
        if self.output_counts is not None:
            logits -= p.frequency_penalty * self.output_counts + p.presence_penalty * (self.output_counts > 0)
        if p.greedy:
            return int(np.argmax(logits))
        logits = logits / np.float32(p.temperature)
        if p.top_k > 0 and p.top_k < logits.size:
            candidates = np.argpartition(logits, -p.top_k)[-p.top_k :]
        else:
            candidates = np.arange(logits.size)
        if p.top_p < 1.0:
            candidates = self._nucleus(logits, candidates, p.top_p)
        chosen_logits = logits[candidates].astype(np.float64)
        weights = np.exp(chosen_logits - chosen_logits.max())
        cumulative = np.cumsum(weights)
        index = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return int(candidates[min(index, len(candidates) - 1)])

    @staticmethod
    def _nucleus(logits: FloatArray, candidates: npt.NDArray[np.int64], top_p: float) -> npt.NDArray[np.int64]:
        """The smallest set of highest-probability candidates whose probability reaches top_p."""
        values = logits[candidates].astype(np.float64)
        weights = np.exp(values - values.max())
        total = weights.sum()
        head = min(_TOP_P_CANDIDATES, len(candidates))
        order = np.argpartition(-weights, head - 1)[:head] if head < len(candidates) else np.arange(len(candidates))
        order = order[np.argsort(-weights[order], kind="stable")]
        cumulative = np.cumsum(weights[order]) / total
        if cumulative[-1] < top_p and head < len(candidates):
            order = np.argsort(-weights, kind="stable")
            cumulative = np.cumsum(weights[order]) / total
        keep = int(np.searchsorted(cumulative, top_p, side="left")) + 1
        return np.asarray(candidates[order[:keep]], dtype=np.int64)


def log_softmax_at(logits: FloatArray, token_id: int) -> float:
    """log P(token) under the model's own distribution (before penalties and temperature)."""
    shifted = logits.astype(np.float64) - float(logits.max())
    return float(shifted[token_id] - np.log(np.exp(shifted).sum()))
