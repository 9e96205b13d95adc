"""Per-token bytes (exact streaming text) and the [2, N] word-list format, without Triton."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from build_engines.tiny_checkpoints import TokenizerStyle
from triton_models.token_bytes import TokenBytes, UnsupportedTokenizer
from triton_models.word_lists import pack_word_lists, unpack_word_lists

TEXTS = ["Hello world, café 東京 🚀 zebra", " leading  spaces\n\tand tabs", "数字 123 and emoji 👍🏽!", "naïve résumé"]


def _check_every_split(tokenizer: Tokenizer) -> int:
    """join(ids[k:]) == decode(ids) - decode(ids[:k]) for every prompt/completion split; returns splits checked."""
    token_bytes = TokenBytes(tokenizer)
    checked = 0
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        full = tokenizer.decode(ids)
        assert token_bytes.join(ids).decode("utf-8").lstrip(" ") == full.lstrip(" ")
        # k from 2: the prompt holds at least one real token after a BOS (an empty prompt is refused).
        for k in range(2, len(ids)):
            prompt = tokenizer.decode(ids[:k])
            if "\ufffd" in prompt:
                continue  # the prompt itself ends mid-character
            assert full.startswith(prompt)
            assert token_bytes.join(ids[k:]).decode("utf-8", errors="replace") == full[len(prompt) :], (text, k)
            checked += 1
    return checked


def test_token_bytes_reproduce_decoding_in_context_for_both_tiny_styles(
    tiny_checkpoints: dict[TokenizerStyle, Path], tiny_style: TokenizerStyle
) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_checkpoints[tiny_style] / "tokenizer.json"))
    assert _check_every_split(tokenizer) > 40


def test_token_bytes_reproduce_decoding_in_context_for_smollm2(reference_checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_file(str(reference_checkpoint / "tokenizer.json"))
    assert _check_every_split(tokenizer) > 20
    token_bytes = TokenBytes(tokenizer)
    assert token_bytes.join([1, 2]) == b""  # <|im_start|>, <|im_end|>: special tokens add no text


def test_sentencepiece_byte_tokens_are_single_raw_bytes(tiny_checkpoints: dict[TokenizerStyle, Path]) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_checkpoints[TokenizerStyle.SENTENCEPIECE] / "tokenizer.json"))
    token_bytes = TokenBytes(tokenizer)
    assert token_bytes.table[tokenizer.token_to_id("<0xF0>")] == b"\xf0"
    assert token_bytes.table[tokenizer.token_to_id("▁world")] == b" world"


def test_unknown_decoder_is_refused() -> None:
    from tokenizers import decoders, models

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.decoder = decoders.WordPiece()
    with pytest.raises(UnsupportedTokenizer, match="WordPiece"):
        TokenBytes(tokenizer)


def test_word_lists_round_trip() -> None:
    words = [[5, 6], [7], [8, 9, 10]]
    packed = pack_word_lists(words)
    assert packed.tolist() == [[5, 6, 7, 8, 9, 10], [2, 3, 6, -1, -1, -1]]
    assert unpack_word_lists(packed) == ((5, 6), (7,), (8, 9, 10))
    assert unpack_word_lists(packed[None, None]) == ((5, 6), (7,), (8, 9, 10))  # batch dimensions
    assert unpack_word_lists(pack_word_lists([])) == ()


@pytest.mark.parametrize(
    "bad",
    [np.array([1, 2, 3]), np.array([[1, 2], [3, 1]]), np.array([[1, 2], [5, -1]]), np.zeros((3, 2), dtype=int)],
)
def test_malformed_word_lists_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="word list"):
        unpack_word_lists(bad)
