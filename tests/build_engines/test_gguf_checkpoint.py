"""GGUF → Hugging Face checkpoint conversion, checked on the SmolLM2 reference and on crafted files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from build_engines.cli import main as build_engines_main
from build_engines.gguf_checkpoint import unpermute_rotary_rows
from build_engines.hf_checkpoint import CHECKPOINT_FILES
from build_engines.reference_model import reference_gguf_path
from tests.prompts import VARIED_PROMPTS


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (restated from its documented formula)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    weight = np.arange(12 * 4 * 5, dtype=np.float32).reshape(12 * 4, 5)
    permuted = _llama_cpp_permute(weight, num_heads=4)
    assert not np.array_equal(permuted, weight)
    assert np.array_equal(unpermute_rotary_rows(permuted, num_heads=4), weight)


def test_reference_checkpoint_has_every_file_and_the_model_facts(reference_checkpoint: Path) -> None:
    for name in CHECKPOINT_FILES:
        assert (reference_checkpoint / name).is_file(), name
    config = json.loads((reference_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert (config["vocab_size"], config["max_position_embeddings"]) == (49152, 8192)
    assert config["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is True
    generation = json.loads((reference_checkpoint / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2]
    tokenizer_config = json.loads((reference_checkpoint / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert tokenizer_config["added_tokens_decoder"]["1"]["special"] is True


def test_reference_tokenizer_keeps_control_tokens_whole_and_splits_digits(reference_checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_file(str(reference_checkpoint / "tokenizer.json"))
    chat = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n")
    assert chat.ids[0] == 1 and 2 in chat.ids
    # llama.cpp's "smollm" pre-tokenizer (and the original SmolLM2 tokenizer) put every digit in its own token.
    digits = tokenizer.encode("In 2024, 12345").tokens
    assert digits == ["In", "Ġ", "2", "0", "2", "4", ",", "Ġ", "1", "2", "3", "4", "5"]
    text = "Café 東京 🚀 done"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


@pytest.mark.transformers
def test_converted_checkpoint_matches_transformers_loading_the_gguf(reference_checkpoint: Path) -> None:
    from tests.hf_reference import hf_greedy, load_hf_model, transformers

    gguf = reference_gguf_path()
    from_gguf = load_hf_model(gguf.parent, gguf_file=gguf.name)
    converted = load_hf_model(reference_checkpoint)
    ours = Tokenizer.from_file(str(reference_checkpoint / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for prompt in VARIED_PROMPTS:
        ids = ours.encode(prompt).ids
        assert hf_greedy(converted, ids, 16) == hf_greedy(from_gguf, ids, 16), prompt
        if not any(ch.isdigit() for ch in prompt):
            # transformers' GGUF reader ignores the "smollm" digit rule, so only digit-free text can agree.
            assert theirs(prompt, add_special_tokens=False)["input_ids"] == ids, prompt


def _write_gguf(path: Path, architecture: str) -> None:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_cli_reports_unsupported_architecture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "falcon.gguf"
    _write_gguf(source, "falcon")
    assert build_engines_main(["checkpoint", "--from-gguf", str(source), "--out", str(tmp_path / "out")]) == 1
    assert "architecture 'falcon' is not supported" in capsys.readouterr().err


def test_cli_reports_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build_engines_main(["checkpoint", "--from-gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path)]) == 1
    assert "no such GGUF file" in capsys.readouterr().err


def test_cli_reference_writes_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ref"
    assert build_engines_main(["checkpoint", "--reference", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(CHECKPOINT_FILES)
