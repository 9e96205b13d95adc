"""LoRA adapters in the CPU engine: greedy tokens equal transformers + peft on the same adapter; adapters and
the base model share batches; bad adapters are refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from build_engines.tiny_checkpoints import TokenizerStyle
from cpu_engine import CheckpointError, Engine, GenerationRequest, ModelConfig, SamplingParams
from cpu_engine.kv_cache import SequenceKVCache
from cpu_engine.lora import LoraAdapter, from_trtllm, load_peft_adapter, to_trtllm
from cpu_engine.model import Segment
from tests.hf_reference import hf_greedy
from tests.peft_adapters import load_reference_with_adapter, write_random_adapter
from tests.prompts import VARIED_PROMPTS

pytestmark = pytest.mark.transformers

NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0)
# Adapters with large random updates flatten the distribution: two logits can differ by less than float32
# summation order moves them (a 1-row and an 8-row product add in different orders). Seen on an AMD EPYC:
# 25.4404 vs 25.4385 after 16 tokens. A wrong adapter on a row moves logits by whole units, from token one.
NEAR_TIE = 0.01


def _greedy(engine: Engine, prompts: list[list[int]], adapters: list[LoraAdapter | None]) -> list[list[int]]:
    requests = [
        GenerationRequest(f"p{i}", tuple(p), NEW_TOKENS, GREEDY, adapter=a)
        for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))
    ]
    results = engine.generate(requests)
    return [results[r.request_id].token_ids for r in requests]


def _logits_after(engine: Engine, token_ids: list[int], adapter: LoraAdapter | None) -> np.ndarray:
    cache = SequenceKVCache(engine.config, len(token_ids))
    return engine.model.forward([Segment(cache, np.array(token_ids, dtype=np.int64), adapter)])[-1]


def _assert_same_greedy_up_to_near_ties(
    engine: Engine, prompts: list[list[int]], adapters: list[LoraAdapter | None],
    got: list[list[int]], expected: list[list[int]], max_parted: int,
) -> None:  # fmt: skip
    """Equal token for token, except that at most `max_parted` runs may part from their expected tokens, each at
    a step whose two candidates are a near tie (after which nothing more can be compared): ties are rare."""
    parted = 0
    for prompt, adapter, ours, theirs in zip(prompts, adapters, got, expected, strict=True):
        step = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
        if step is None:
            assert len(ours) == len(theirs)
            continue
        parted += 1
        logits = _logits_after(engine, prompt + theirs[:step], adapter)
        gap = abs(float(logits[ours[step]]) - float(logits[theirs[step]]))
        assert gap < NEAR_TIE, f"parted at step {step} on tokens {ours[step]} and {theirs[step]}, logit gap {gap}"
    assert parted <= max_parted


@pytest.fixture(scope="module")
def smollm_adapters(reference_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [write_random_adapter(reference_checkpoint, root / f"a{seed}", seed=seed) for seed in (1, 2)]


def test_smollm2_with_an_adapter_matches_transformers_and_peft(
    reference_checkpoint: Path, reference_engine: Engine, smollm_adapters: list[Path]
) -> None:
    tokenizer = Tokenizer.from_file(str(reference_checkpoint / "tokenizer.json"))
    prompts = [tokenizer.encode(p).ids for p in VARIED_PROMPTS[:4]]
    config = ModelConfig.from_checkpoint(reference_checkpoint)
    adapter = load_peft_adapter(smollm_adapters[0], config)
    reference = load_reference_with_adapter(reference_checkpoint, smollm_adapters[0])
    expected = [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]
    adapters = [adapter] * len(prompts)
    ours = _greedy(reference_engine, prompts, adapters)
    # torch and numpy sum in different orders too: the same near-tie allowance as for batching, below.
    _assert_same_greedy_up_to_near_ties(reference_engine, prompts, adapters, ours, expected, max_parted=1)
    base = _greedy(reference_engine, prompts, [None] * len(prompts))
    assert all(a != b for a, b in zip(expected, base, strict=True))  # the adapter really changes the output


def test_adapters_and_the_base_model_share_a_batch(
    reference_checkpoint: Path, reference_engine: Engine, smollm_adapters: list[Path]
) -> None:
    tokenizer = Tokenizer.from_file(str(reference_checkpoint / "tokenizer.json"))
    config = ModelConfig.from_checkpoint(reference_checkpoint)
    first, second = (load_peft_adapter(a, config) for a in smollm_adapters)
    prompts = [tokenizer.encode(VARIED_PROMPTS[i % 4]).ids for i in range(8)]
    adapters = [[first, second, None][i % 3] for i in range(8)]
    solo = [_greedy(reference_engine, [p], [a])[0] for p, a in zip(prompts, adapters, strict=True)]
    batched = _greedy(reference_engine, prompts, adapters)
    _assert_same_greedy_up_to_near_ties(reference_engine, prompts, adapters, batched, solo, max_parted=2)


def test_tiny_checkpoints_with_an_adapter_match_transformers_and_peft(
    tiny_checkpoints: dict[TokenizerStyle, Path], tiny_style: TokenizerStyle, tmp_path: Path
) -> None:
    checkpoint = tiny_checkpoints[tiny_style]
    adapter_dir = write_random_adapter(checkpoint, tmp_path / "adapter", seed=3, rank=4,
                                       target_modules=["q_proj", "v_proj", "down_proj"])  # fmt: skip
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    prompts = [tokenizer.encode(p).ids for p in VARIED_PROMPTS[:3]]
    adapter = load_peft_adapter(adapter_dir, ModelConfig.from_checkpoint(checkpoint))
    assert adapter.target_modules == ("down_proj", "q_proj", "v_proj")
    reference = load_reference_with_adapter(checkpoint, adapter_dir)
    expected = [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]
    assert _greedy(Engine.from_checkpoint(checkpoint), prompts, [adapter] * 3) == expected


def test_the_tensorrt_llm_lora_tensors_serve_the_same_adapter_on_the_tiny_checkpoints(
    tiny_checkpoints: dict[TokenizerStyle, Path], tiny_style: TokenizerStyle, tmp_path: Path
) -> None:
    """What the gateway sends (lora_weights float16, lora_config rows) is, for a half-precision adapter, exactly the
    adapter: greedy tokens equal transformers + peft."""
    checkpoint = tiny_checkpoints[tiny_style]
    adapter_dir = write_random_adapter(checkpoint, tmp_path / "adapter", seed=6, rank=4, alpha=8.0,
                                       half_precision=True)  # fmt: skip
    config = ModelConfig.from_checkpoint(checkpoint)
    weights, rows = to_trtllm(load_peft_adapter(adapter_dir, config))
    assert weights.dtype == np.float16 and rows.shape == (config.num_layers * 7, 3)
    assert sorted({int(m) for m in rows[:, 0]}) == [1, 2, 3, 4, 5, 6, 7] and set(rows[:, 2]) == {4}
    adapter = from_trtllm(weights, rows, config, max_rank=4)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    prompts = [tokenizer.encode(p).ids for p in VARIED_PROMPTS[:3]]
    reference = load_reference_with_adapter(checkpoint, adapter_dir)
    expected = [hf_greedy(reference, p, NEW_TOKENS) for p in prompts]
    assert _greedy(Engine.from_checkpoint(checkpoint), prompts, [adapter] * 3) == expected


def test_malformed_tensorrt_llm_lora_tensors_are_refused(
    tiny_checkpoints: dict[TokenizerStyle, Path], tmp_path: Path
) -> None:
    checkpoint = tiny_checkpoints[TokenizerStyle.BYTE_BPE]
    config = ModelConfig.from_checkpoint(checkpoint)
    weights, rows = to_trtllm(load_peft_adapter(write_random_adapter(checkpoint, tmp_path / "a", seed=7), config))
    with pytest.raises(ValueError, match="maximum LoRA rank"):
        from_trtllm(weights, rows, config, max_rank=4)
    with pytest.raises(ValueError, match=r"attn_k \(k_proj\) is not enabled"):
        from_trtllm(weights, rows, config, max_rank=64, allowed_modules=("q_proj", "v_proj"))
    bad = rows.copy()
    bad[0, 0] = 9
    with pytest.raises(ValueError, match="module id 9"):
        from_trtllm(weights, bad, config, max_rank=64)
    with pytest.raises(ValueError, match="one row per lora_config row"):
        from_trtllm(weights[:-1], rows, config, max_rank=64)
    with pytest.raises(ValueError, match="shorter than rank"):
        from_trtllm(weights[:, :10], rows, config, max_rank=64)


def test_bad_adapters_are_refused_with_the_reason(tiny_checkpoints: dict[TokenizerStyle, Path], tmp_path: Path) -> None:
    byte_bpe, sentencepiece = (tiny_checkpoints[s] for s in (TokenizerStyle.BYTE_BPE, TokenizerStyle.SENTENCEPIECE))
    config = ModelConfig.from_checkpoint(byte_bpe)
    good = write_random_adapter(byte_bpe, tmp_path / "good", seed=4, rank=8)
    with pytest.raises(CheckpointError, match="above the engine's maximum LoRA rank of 4"):
        load_peft_adapter(good, config, max_rank=4)
    other = write_random_adapter(sentencepiece, tmp_path / "other", seed=5, rank=4)
    with pytest.raises(CheckpointError, match="do not fit the base model"):
        load_peft_adapter(other, _differently_shaped(config))
    (tmp_path / "missing").mkdir()
    (tmp_path / "missing" / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors is missing"):
        load_peft_adapter(tmp_path / "missing", config)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    (broken / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_peft_adapter(broken, config)
    settings = json.loads((good / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**settings, "target_modules": ["q_proj", "wq"]}))
    with pytest.raises(CheckpointError, match=r"target modules \['wq'\]"):
        load_peft_adapter(broken, config)
    # Per-module ranks or scalings (PEFT's rank_pattern / alpha_pattern) were ignored: refused now.
    (broken / "adapter_config.json").write_text(json.dumps({**settings, "alpha_pattern": {"q_proj": 32}}))
    with pytest.raises(CheckpointError, match="per-module alpha_pattern are not supported"):
        load_peft_adapter(broken, config)
    # Left out of the file, lora_alpha is PEFT's default (8), not 0 (which made the adapter a no-op).
    without_alpha = {k: v for k, v in settings.items() if k != "lora_alpha"}
    (broken / "adapter_config.json").write_text(json.dumps({**without_alpha, "r": 8}))
    assert load_peft_adapter(broken, config).alpha == 8.0


def _differently_shaped(config: ModelConfig) -> ModelConfig:
    """The same architecture with a wider MLP: an adapter trained for the other model cannot fit it."""
    from dataclasses import replace

    return replace(config, intermediate_size=config.intermediate_size * 2, hidden_size=config.hidden_size * 2)
