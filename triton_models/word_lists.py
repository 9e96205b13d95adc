"""TensorRT-LLM's stop/bad word list format: an INT32 [2, N] array per request.

Row 0 holds the token ids of all words concatenated; row 1 holds each word's cumulative end offset into
row 0, padded with -1 to the same length. `[[5, 6, 7, 8], [2, 4, -1, -1]]` is the words (5, 6) and (7, 8).
Preprocessing writes it, the generation model (ours or TensorRT-LLM's) reads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def pack_word_lists(words: list[list[int]]) -> npt.NDArray[np.int32]:
    """[2, N] array for these token-id words (an empty list gives the [2, 1] "no words" array)."""
    words = [w for w in words if w]
    if not words:
        return np.array([[0], [-1]], dtype=np.int32)
    flat = [token for word in words for token in word]
    offsets = np.cumsum([len(w) for w in words]).tolist()
    padded = offsets + [-1] * (len(flat) - len(offsets))
    return np.array([flat, padded], dtype=np.int32)


def unpack_word_lists(packed: npt.NDArray[np.integer[Any]]) -> tuple[tuple[int, ...], ...]:
    """The inverse of pack_word_lists; raises ValueError on a malformed array."""
    array = np.asarray(packed)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]  # drop batch dimensions of size one
    if array.ndim != 2 or array.shape[0] != 2:
        raise ValueError(f"a word list must have shape [2, N], got {list(np.asarray(packed).shape)}")
    flat, offsets = array[0].tolist(), array[1].tolist()
    words: list[tuple[int, ...]] = []
    start = 0
    for end in offsets:
        if end < 0:
            break
        if end <= start or end > len(flat):
            raise ValueError(f"word list offsets must increase within [1, {len(flat)}], got {offsets}")
        words.append(tuple(int(t) for t in flat[start:end]))
        start = end
    return tuple(words)
