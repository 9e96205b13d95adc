"""The tiny test checkpoints: deterministic, and each tokenizer style behaves like its real family."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from build_engines.cli import main as build_engines_main
from build_engines.hf_checkpoint import CHECKPOINT_FILES
from build_engines.tiny_checkpoints import TokenizerStyle, write_tiny_checkpoint
from cpu_engine import ModelConfig


def test_same_arguments_give_identical_files(tmp_path: Path, tiny_style: TokenizerStyle) -> None:
    first = write_tiny_checkpoint(tmp_path / "a", tiny_style)
    second = write_tiny_checkpoint(tmp_path / "b", tiny_style)
    for name in CHECKPOINT_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    other_seed = write_tiny_checkpoint(tmp_path / "c", tiny_style, seed=1)
    assert (other_seed / "model.safetensors").read_bytes() != (first / "model.safetensors").read_bytes()


def test_tiny_models_are_small_llamas_with_grouped_query_attention(
    tiny_checkpoints: dict[TokenizerStyle, Path],
) -> None:
    for checkpoint in tiny_checkpoints.values():
        config = ModelConfig.from_checkpoint(checkpoint)
        assert config.num_layers <= 4 and config.vocab_size <= 1024
        assert config.num_kv_heads < config.num_heads


def test_byte_bpe_style_puts_spaces_in_front_of_tokens(tiny_checkpoints: dict[TokenizerStyle, Path]) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_checkpoints[TokenizerStyle.BYTE_BPE] / "tokenizer.json"))
    encoding = tokenizer.encode("Hello world 東京 🚀")
    assert "Ġworld" in encoding.tokens
    assert tokenizer.decode(encoding.ids) == "Hello world 東京 🚀"


def test_sentencepiece_style_uses_metaspace_byte_fallback_and_bos(tiny_checkpoints: dict[TokenizerStyle, Path]) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_checkpoints[TokenizerStyle.SENTENCEPIECE] / "tokenizer.json"))
    encoding = tokenizer.encode("Hello world 🚀")
    assert encoding.tokens[0] == "<s>"
    assert "▁world" in encoding.tokens
    assert encoding.tokens[-4:] == ["<0xF0>", "<0x9F>", "<0x9A>", "<0x80>"]  # 🚀 is not in the vocabulary
    assert tokenizer.decode(encoding.ids) == "Hello world 🚀"


def test_cli_writes_a_tiny_checkpoint(tmp_path: Path) -> None:
    assert build_engines_main(["tiny", "--style", "sentencepiece", "--out", str(tmp_path / "t")]) == 0
    assert all((tmp_path / "t" / name).is_file() for name in CHECKPOINT_FILES)
