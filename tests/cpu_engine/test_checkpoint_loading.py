"""Loading checkpoints: config variants, weight dtypes, RoPE scaling kinds."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from cpu_engine import CheckpointError, ModelConfig
from cpu_engine.rope import inverse_frequencies
from cpu_engine.safetensors_reader import iter_safetensors

BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "eos_token_id": 2,
}


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(t[2] for t in tensors.values()))


def test_reader_widens_bf16_f16_and_f32_exactly(tmp_path: Path) -> None:
    values = np.array([1.0, -2.5, 0.15625, 32768.0], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()  # all four are exact in bfloat16
    path = tmp_path / "w.safetensors"
    _write_safetensors(
        path,
        {
            "a": ("BF16", [2, 2], bf16),
            "b": ("F16", [4], values.astype("<f2").tobytes()),
            "c": ("F32", [4], values.tobytes()),
        },
    )
    tensors = dict(iter_safetensors(path))
    assert tensors["a"].shape == (2, 2)
    for name in "abc":
        assert tensors[name].dtype == np.float32
        assert np.array_equal(tensors[name].reshape(-1), values), name


def test_unsupported_dtype_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _write_safetensors(path, {"a": ("F8_E4M3", [2], b"\x00\x01")})
    with pytest.raises(CheckpointError, match="F8_E4M3"):
        dict(iter_safetensors(path))


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel"):
        ModelConfig.from_dict({**BASE_CONFIG, "architectures": ["GPT2LMHeadModel"]})


def test_every_end_id_comes_from_generation_config() -> None:
    config = ModelConfig.from_dict(BASE_CONFIG, {"eos_token_id": [128001, 128009]})
    assert config.eos_token_ids == (128001, 128009)
    assert ModelConfig.from_dict(BASE_CONFIG).eos_token_ids == (2,)


def test_transformers5_rope_parameters_are_understood() -> None:
    config = ModelConfig.from_dict(
        {**BASE_CONFIG, "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}}
    )
    assert config.rope_theta == 5e5
    assert config.rope_scaling is not None and config.rope_scaling["factor"] == 2.0


def test_dynamic_rope_scaling_is_refused() -> None:
    with pytest.raises(CheckpointError, match="dynamic"):
        inverse_frequencies(64, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 4096)


@pytest.mark.transformers
@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 16, "mscale": 0.7,
         "mscale_all_dim": 0.5},
    ],
    ids=["default", "linear", "llama3", "yarn", "yarn-mscale"],
)  # fmt: skip
def test_rope_frequencies_match_transformers(scaling: dict[str, object] | None) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tests.hf_reference import transformers

    theta = 500000.0
    raw = {**BASE_CONFIG, "head_dim": 64, "hidden_size": 256, "rope_theta": theta, "rope_scaling": scaling}
    hf_config = transformers.LlamaConfig(**raw)
    ours, our_factor = inverse_frequencies(64, theta, scaling, raw["max_position_embeddings"])  # type: ignore[arg-type]
    if scaling is None:
        expected = 1.0 / (theta ** (np.arange(0, 64, 2) / 64))
        their_factor = 1.0
    else:
        inv, their_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, "cpu")  # type: ignore[index]
        expected = inv.numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    assert our_factor == pytest.approx(their_factor)


def test_linear_gives_the_matrix_product_for_any_number_of_rows() -> None:
    from cpu_engine.model import _linear

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((48, 32)).astype(np.float32)
    for rows in (1, 2, 3, 16):
        x = rng.standard_normal((rows, 32)).astype(np.float32)
        np.testing.assert_allclose(_linear(x, weight), x @ weight.T, rtol=1e-5, atol=1e-5)


def test_vocab_logits_in_chunks_equal_the_whole_product() -> None:
    from cpu_engine.model import _VOCAB_CHUNK, _vocab_logits

    rng = np.random.default_rng(1)
    head = rng.standard_normal((2 * _VOCAB_CHUNK + 123, 32)).astype(np.float32)  # a ragged last chunk
    for rows in (1, 2, 3, 16):
        hidden = rng.standard_normal((rows, 32)).astype(np.float32)
        logits = _vocab_logits(hidden, head)
        assert logits.flags.c_contiguous
        np.testing.assert_allclose(logits, hidden @ head.T, rtol=1e-4, atol=1e-4)
