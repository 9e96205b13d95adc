"""Per-sequence key/value caches and the token budget they are drawn from.

Each sequence reserves its worst case (prompt + max new tokens) when it is admitted, so a running
sequence can never run out of cache mid-generation ("guaranteed no evict", as TensorRT-LLM's default
scheduler policy). The arrays are allocated with `np.empty`: the operating system backs pages only when
they are first written, so resident memory follows the tokens actually cached, and the budget bounds
the worst case.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cpu_engine.config import ModelConfig


class SequenceKVCache:
    """Keys and values of one sequence: [layers, kv_heads, capacity, head_dim] each."""

    def __init__(self, config: ModelConfig, capacity: int) -> None:
        shape = (config.num_layers, config.num_kv_heads, capacity, config.head_dim)
        self.keys: npt.NDArray[np.float32] = np.empty(shape, dtype=np.float32)
        self.values: npt.NDArray[np.float32] = np.empty(shape, dtype=np.float32)
        self.capacity = capacity
        self.length = 0  # tokens whose keys and values are stored (all layers)


class KVTokenBudget:
    """Counts reserved cache tokens against a fixed budget."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.reserved = 0

    def can_reserve(self, tokens: int) -> bool:
        return self.reserved + tokens <= self.max_tokens

    def reserve(self, tokens: int) -> None:
        if not self.can_reserve(tokens):
            raise RuntimeError("KV-token budget exceeded")  # callers check can_reserve first
        self.reserved += tokens

    def release(self, tokens: int) -> None:
        self.reserved -= tokens
