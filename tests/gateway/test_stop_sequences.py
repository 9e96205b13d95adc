"""Stop sequences on text, however the text is split into chunks (the same text tokenizes into different
pieces; streamed and non-streamed answers must agree). End to end with the SDK: test_sdk.py."""

from __future__ import annotations

import itertools

import pytest

from gateway.stop_sequences import StopSequenceMatcher


def _cut(pieces: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    matcher = StopSequenceMatcher(stops)
    text = "".join(matcher.feed(piece) for piece in pieces) + matcher.flush()
    return text, matcher.matched


def _every_split(text: str, parts: int) -> list[list[str]]:
    splits = []
    for cuts in itertools.combinations(range(1, len(text)), parts - 1):
        bounds = [0, *cuts, len(text)]
        splits.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return splits


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        (" Paris.\n\nThe answer", ("Paris", "ar"), " P"),  # "ar" completes first, inside "Paris"
        (" Paris.\n\nThe answer", ("ris.\n", "s"), " Pari"),  # "s" completes before "ris.\n" does
        (" Paris.\n\nThe answer", ("is", "s"), " Par"),  # both complete at the same character: the longer cut
        (" Paris.\n\nThe answer", ("\n\n", "The"), " Paris."),
        (" Paris.\n\nThe answer", ("nope",), " Paris.\n\nThe answer"),
        ("日本語のテキスト😀です", ("😀", "テキ"), "日本語の"),
        ("abcabd", ("abd", "cab"), "ab"),  # "cab" ends at 5, "abd" at 6
    ],
)
def test_the_cut_is_the_same_however_the_text_is_chunked(text: str, stops: tuple[str, ...], expected: str) -> None:
    for parts in (1, 2, 3):
        for pieces in _every_split(text, parts):
            assert _cut(pieces, stops) == (expected, expected != text), pieces


def test_text_that_might_start_a_stop_sequence_is_held_back_until_it_cannot() -> None:
    matcher = StopSequenceMatcher(("<|end|>",))
    assert matcher.feed("Hello <|e") == "Hello "
    assert matcher.feed("nd") == ""
    assert matcher.feed("x") == "<|endx"  # it did not become one
    assert matcher.feed(" and <|end|> more") == " and "
    assert matcher.matched and matcher.feed("later") == "" and matcher.flush() == ""
