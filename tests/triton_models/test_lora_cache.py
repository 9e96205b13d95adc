"""The CPU generation model's LoRA cache: TensorRT-LLM's semantics (load with weights, task id alone afterwards,
least recently used idle adapter evicted, adapters in use never evicted) and its messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from build_engines.tiny_checkpoints import TokenizerStyle
from cpu_engine import ModelConfig
from cpu_engine.lora import LoraAdapter, LoraModule, to_trtllm
from triton_models.lora_cache import LoraCache, LoraCacheError, LoraInput


def _tensors(config: ModelConfig, seed: int) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.int32]]:
    rng = np.random.default_rng(seed)
    q_out = config.num_heads * config.head_dim
    layer = {"q_proj": LoraModule(rng.standard_normal((2, config.hidden_size), np.float32),
                                  rng.standard_normal((q_out, 2), np.float32))}  # fmt: skip
    adapter = LoraAdapter(rank=2, alpha=2.0, target_modules=("q_proj",), layers=(layer,) * config.num_layers)
    return to_trtllm(adapter)


@pytest.fixture
def cache(tiny_checkpoints: dict[TokenizerStyle, Path]) -> LoraCache:
    return LoraCache(ModelConfig.from_checkpoint(tiny_checkpoints[TokenizerStyle.BYTE_BPE]), capacity=2, max_rank=8)


def _with_weights(cache: LoraCache, task_id: int) -> LoraInput:
    return LoraInput(task_id, *_tensors(cache.model, task_id))


def test_weights_load_once_and_the_task_id_alone_finds_them(cache: LoraCache) -> None:
    with pytest.raises(LoraCacheError, match=r"LoRA task 1 not found in cache\. Please send LoRA weights with request"):
        cache.acquire(LoraInput(1, None, None))
    loaded = cache.acquire(_with_weights(cache, 1))
    cache.release(1)
    assert cache.acquire(LoraInput(1, None, None)) is loaded
    cache.release(1)
    assert (cache.stats.loads, cache.stats.misses, cache.stats.cached) == (1, 1, 1)


def test_the_least_recently_used_idle_adapter_is_evicted(cache: LoraCache) -> None:
    for task_id in (1, 2):
        cache.acquire(_with_weights(cache, task_id))
        cache.release(task_id)
    cache.acquire(LoraInput(1, None, None))  # 1 is now the most recently used
    cache.release(1)
    cache.acquire(_with_weights(cache, 3))  # evicts 2
    cache.release(3)
    cache.acquire(LoraInput(1, None, None))
    with pytest.raises(LoraCacheError, match="LoRA task 2 not found"):
        cache.acquire(LoraInput(2, None, None))
    assert cache.stats.evictions == 1


def test_adapters_in_use_are_never_evicted(cache: LoraCache) -> None:
    cache.acquire(_with_weights(cache, 1))
    cache.acquire(_with_weights(cache, 2))  # both still running
    with pytest.raises(LoraCacheError, match=r"Cache is full\. There are no done tasks to evict"):
        cache.acquire(_with_weights(cache, 3))
    cache.release(2)
    cache.acquire(_with_weights(cache, 3))  # 2 finished: it makes room
    assert cache.acquire(LoraInput(1, None, None)) is not None


def test_a_model_without_lora_refuses_adapters(tiny_checkpoints: dict[TokenizerStyle, Path]) -> None:
    off = LoraCache(ModelConfig.from_checkpoint(tiny_checkpoints[TokenizerStyle.BYTE_BPE]), capacity=8, max_rank=0)
    with pytest.raises(LoraCacheError, match="not built with LoRA support"):
        off.acquire(_with_weights(off, 1))
