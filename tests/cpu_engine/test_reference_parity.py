"""The engine's greedy tokens equal Hugging Face transformers' on the same checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from build_engines.tiny_checkpoints import TokenizerStyle
from cpu_engine import Engine, GenerationRequest, SamplingParams
from tests.hf_reference import hf_greedy, load_hf_model
from tests.prompts import VARIED_PROMPTS

pytestmark = pytest.mark.transformers

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0)


def _engine_greedy(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    requests = [GenerationRequest(f"p{i}", tuple(p), NEW_TOKENS, GREEDY) for i, p in enumerate(prompts)]
    results = engine.generate(requests)
    return [results[r.request_id].token_ids for r in requests]


def test_smollm2_greedy_matches_transformers(reference_checkpoint: Path, reference_engine: Engine) -> None:
    tokenizer = Tokenizer.from_file(str(reference_checkpoint / "tokenizer.json"))
    prompts = [tokenizer.encode(p).ids for p in VARIED_PROMPTS]
    model = load_hf_model(reference_checkpoint)
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    assert _engine_greedy(reference_engine, prompts) == expected
    assert len({tuple(e) for e in expected}) == len(prompts)  # the prompts really lead to different outputs


def test_tiny_checkpoint_greedy_matches_transformers(
    tiny_checkpoints: dict[TokenizerStyle, Path], tiny_style: TokenizerStyle
) -> None:
    checkpoint = tiny_checkpoints[tiny_style]
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    prompts = [tokenizer.encode(p).ids for p in VARIED_PROMPTS]
    model = load_hf_model(checkpoint)
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    assert _engine_greedy(Engine.from_checkpoint(checkpoint), prompts) == expected


def test_tiny_checkpoint_with_qkv_bias_matches_transformers_qwen2(
    tiny_checkpoints: dict[TokenizerStyle, Path], tmp_path: Path
) -> None:
    """Qwen2-style models differ from Llama by a bias on the q/k/v projections."""
    import json

    import numpy as np
    from safetensors.numpy import load_file, save_file

    source = tiny_checkpoints[TokenizerStyle.BYTE_BPE]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / name).write_text((source / name).read_text())
    config = json.loads((source / "config.json").read_text())
    config.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(source / "model.safetensors"))
    rng = np.random.default_rng(7)
    for layer in range(config["num_hidden_layers"]):
        for proj in "qkv":
            rows = tensors[f"model.layers.{layer}.self_attn.{proj}_proj.weight"].shape[0]
            tensors[f"model.layers.{layer}.self_attn.{proj}_proj.bias"] = rng.standard_normal(rows).astype(np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    prompts = [[5, 100, 200, 300], [17, 40], list(range(30, 90))]
    model = load_hf_model(tmp_path)
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    engine = Engine.from_checkpoint(tmp_path)
    assert engine.model.layers[0].qkv_bias is not None
    assert _engine_greedy(engine, prompts) == expected
