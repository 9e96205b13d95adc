"""The CPU generation model's LoRA cache, with TensorRT-LLM's semantics (and its error messages, which the
gateway recognises):

- a request with `lora_task_id`, `lora_weights` and `lora_config` loads the adapter under that task id;
- a request with the task id alone uses the cached adapter, or fails with "LoRA task N not found in cache";
- the cache holds at most `capacity` adapters; loading another evicts the least recently used one that no
  running request uses ("Cache is full. There are no done tasks to evict" when every one is in use).

Only the scheduler thread touches it (no lock).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpu_engine import ModelConfig
from cpu_engine.lora import MODULES, LoraAdapter, from_trtllm


@dataclass(frozen=True)
class LoraInput:
    """A request's LoRA inputs, as they arrived."""

    task_id: int
    weights: npt.NDArray[np.generic] | None
    config: npt.NDArray[np.generic] | None


class LoraCacheError(ValueError):
    pass


@dataclass
class _Entry:
    adapter: LoraAdapter
    users: int = 0  # running requests


@dataclass
class LoraCacheStats:
    cached: int = 0
    loads: int = 0  # adapters converted from weights sent with a request
    misses: int = 0  # requests naming a task id that was not cached
    evictions: int = 0


class LoraCache:
    def __init__(self, model: ModelConfig, capacity: int, max_rank: int, modules: tuple[str, ...] = MODULES) -> None:
        self.model = model
        self.capacity = capacity
        self.max_rank = max_rank
        self.modules = modules
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        self.stats = LoraCacheStats()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0 and self.max_rank > 0

    def acquire(self, lora: LoraInput) -> LoraAdapter:
        """The adapter for this request, marked in use until `release(task_id)`; LoraCacheError if it cannot be."""
        if not self.enabled:
            raise LoraCacheError("this model was not built with LoRA support (lora_max_rank is 0)")
        entry = self._entries.get(lora.task_id)
        if entry is None:
            if lora.weights is None or lora.config is None:
                self.stats.misses += 1
                raise LoraCacheError(
                    f"LoRA task {lora.task_id} not found in cache. Please send LoRA weights with request"
                )
            adapter = from_trtllm(lora.weights, lora.config, self.model, self.max_rank, self.modules)
            self._make_room()
            entry = self._entries[lora.task_id] = _Entry(adapter)
            self.stats.loads += 1
        self._entries.move_to_end(lora.task_id)
        entry.users += 1
        self.stats.cached = len(self._entries)
        return entry.adapter

    def release(self, task_id: int) -> None:
        entry = self._entries.get(task_id)
        if entry is not None:
            entry.users -= 1

    def _make_room(self) -> None:
        while len(self._entries) >= self.capacity:
            idle = next((task_id for task_id, entry in self._entries.items() if entry.users == 0), None)
            if idle is None:
                raise LoraCacheError("Cache is full. There are no done tasks to evict")
            del self._entries[idle]
            self.stats.evictions += 1
