"""The exact bytes every token adds to the text, so streamed pieces concatenate to the full text.

Decoding each streamed token on its own drops SentencePiece's leading spaces ("▁world" alone decodes to
"world") and splits multi-byte UTF-8 characters (a CJK character or an emoji spread over byte tokens
decodes to U+FFFD). Postprocessing is stateless and may run as several instances, so it cannot hold
context. Instead each token maps to the bytes it contributes *in context* — its text with the leading
space, or the single raw byte of a byte token — and consumers decode UTF-8 incrementally. Joining the
bytes of a completion's tokens gives exactly `decode(prompt + output) - decode(prompt)`.

The table is derived from the `tokenizer.json` decoder: byte-level BPE (GPT-2, Llama 3, SmolLM) maps
each character to one byte; SentencePiece style (metaspace "▁" with byte fallback) maps "▁" to a space
and `<0xNN>` to that byte. Special tokens contribute nothing (the API returns no special tokens).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class UnsupportedTokenizer(ValueError):
    """The tokenizer's decoder is not one whose per-token bytes we know how to derive."""


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for every byte, inverted: character → byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, characters, strict=True)}


def _decoder_kinds(decoder: dict[str, Any] | None) -> list[dict[str, Any]]:
    if decoder is None:
        return []
    if decoder.get("type") == "Sequence":
        return [d for part in decoder.get("decoders", []) for d in _decoder_kinds(part)]
    return [decoder]


class TokenBytes:
    """Token id → the bytes it contributes to the completion text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        spec = json.loads(tokenizer.to_str())
        kinds = {d.get("type") for d in _decoder_kinds(spec.get("decoder"))}
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        pieces = [tokenizer.id_to_token(i) or "" for i in range(vocab_size)]
        if "ByteLevel" in kinds:
            alphabet = byte_level_alphabet()
            table = [bytes(alphabet[ch] for ch in piece if ch in alphabet) for piece in pieces]
        elif "Metaspace" in kinds or ("Replace" in kinds and "ByteFallback" in kinds):
            table = [self._sentencepiece_piece(piece, "ByteFallback" in kinds) for piece in pieces]
        else:
            raise UnsupportedTokenizer(
                f"cannot derive per-token bytes for a tokenizer with decoders {sorted(str(k) for k in kinds)}"
            )
        for token in spec.get("added_tokens", []):
            table[token["id"]] = b"" if token.get("special") else token["content"].encode("utf-8")
        self.table = table

    @classmethod
    def from_file(cls, tokenizer_json: Path) -> TokenBytes:
        return cls(Tokenizer.from_file(str(tokenizer_json)))

    @staticmethod
    def _sentencepiece_piece(piece: str, byte_fallback: bool) -> bytes:
        match = _BYTE_TOKEN.match(piece)
        if byte_fallback and match:
            return bytes([int(match.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")

    def join(self, token_ids: list[int]) -> bytes:
        """The bytes of these tokens, in order (ids outside the vocabulary contribute nothing)."""
        table = self.table
        return b"".join(table[t] for t in token_ids if 0 <= t < len(table))
