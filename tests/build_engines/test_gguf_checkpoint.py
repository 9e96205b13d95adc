"""GGUF → Hugging Face checkpoint conversion, checked on the SmolLM2 reference and on crafted files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from build_engines.cli import main as build_engines_main
from build_engines.gguf_checkpoint import unpermute_rotary_rows
from build_engines.gguf_tokenizer import GGUFTokenizerData, build_tokenizer
from build_engines.hf_checkpoint import CHECKPOINT_FILES
from build_engines.reference_model import reference_gguf_path
from cpu_engine.errors import CheckpointError
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


def _write_llama_gguf(path: Path, eos: int = 1, extra_tensor: str | None = None) -> None:
    """A Llama GGUF whose metadata is complete and whose tensors are tiny: enough for the checks that run
    before any weight is read."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(["a", "b", "c"])
    writer.add_eos_token_id(eos)
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    if extra_tensor is not None:
        writer.add_tensor(extra_tensor, np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    ("eos", "extra_tensor", "message"),
    [
        (7, None, "tokenizer.ggml.eos_token_id 7 is outside the 3-token vocabulary"),
        (1, "rope_freqs.weight", "Llama 3.1-style rope scaling"),
        (1, "blk.0.attn_qkv.weight", "'blk.0.attn_qkv.weight' has no Llama equivalent"),
    ],
)
def test_cli_refuses_what_it_cannot_convert_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], eos: int, extra_tensor: str | None, message: str
) -> None:
    source = tmp_path / "model.gguf"
    _write_llama_gguf(source, eos, extra_tensor)
    assert build_engines_main(["checkpoint", "--from-gguf", str(source), "--out", str(tmp_path / "out")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_file_that_is_not_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "weights.gguf"
    source.write_bytes(b"PK\x03\x04 not a gguf file at all" * 10)
    assert build_engines_main(["checkpoint", "--from-gguf", str(source), "--out", str(tmp_path / "out")]) == 1
    assert "weights.gguf: not a readable GGUF file" in capsys.readouterr().err


def _bpe_data(pre: str, token_types: list[int] | None = None) -> GGUFTokenizerData:
    tokens = ["a", "b", "c", "ab", "abc"]
    return GGUFTokenizerData(
        model="gpt2", pre=pre, tokens=tokens, token_types=[1] * len(tokens) if token_types is None else token_types,
        merges=["a b"], bos_id=None, add_bos=False,
    )  # fmt: skip


def test_llama3_vocabularies_take_whole_words_before_merges_as_llama_cpp_does() -> None:
    # "abc" is in the vocabulary but no merge makes it: llama.cpp's llama3 pre-tokenizer (and Llama 3's
    # tokenizer.json, "ignore_merges") takes it whole; byte-level BPE without that rule does not.
    assert build_tokenizer(_bpe_data("llama-bpe")).encode("abc").tokens == ["abc"]
    assert build_tokenizer(_bpe_data("gpt2")).encode("abc").tokens == ["ab", "c"]


def test_a_file_without_a_pre_tokenizer_is_refused_and_token_types_are_optional() -> None:
    with pytest.raises(CheckpointError, match="records no pre-tokenizer"):
        build_tokenizer(_bpe_data("default"))
    assert build_tokenizer(_bpe_data("gpt2", token_types=[])).encode("ab").tokens == ["ab"]
    with pytest.raises(CheckpointError, match="2 token types for 5 tokens"):
        build_tokenizer(_bpe_data("gpt2", token_types=[1, 1]))
