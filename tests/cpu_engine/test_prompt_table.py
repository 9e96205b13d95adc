"""Prompt tables (TensorRT-LLM's p-tuning, how image features enter the prompt): ids past the vocabulary take
their embedding from the request's table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from build_engines.tiny_checkpoints import TokenizerStyle
from cpu_engine import Engine, GenerationRequest, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def test_table_rows_act_exactly_like_the_embeddings_they_hold(tiny_checkpoints: dict[TokenizerStyle, Path]) -> None:
    engine = Engine.from_checkpoint(tiny_checkpoints[TokenizerStyle.BYTE_BPE])
    vocab = engine.config.vocab_size
    prompt = (5, 17, 42, 99, 7, 300)
    # Rows 0 and 1 of the table hold the embeddings of tokens 42 and 99: ids vocab+0 and vocab+1 replace them.
    table = engine.model.embed[[42, 99]].copy()
    with_table = (5, 17, vocab, vocab + 1, 7, 300)
    results = engine.generate(
        [
            GenerationRequest("real", prompt, 12, GREEDY),
            GenerationRequest("table", with_table, 12, GREEDY, prompt_table=table),
            GenerationRequest("other", with_table, 12, GREEDY, prompt_table=table[::-1].copy()),
        ]
    )
    assert results["table"].token_ids == results["real"].token_ids
    assert results["other"].token_ids != results["real"].token_ids  # the rows really are used


def test_ids_past_the_table_or_a_misshapen_table_are_refused(tiny_checkpoints: dict[TokenizerStyle, Path]) -> None:
    engine = Engine.from_checkpoint(tiny_checkpoints[TokenizerStyle.BYTE_BPE])
    vocab, hidden = engine.config.vocab_size, engine.config.hidden_size
    table = np.zeros((2, hidden), dtype=np.float32)
    with pytest.raises(ValueError, match=rf"\[{vocab}, {vocab + 2}\) for the prompt table's rows"):
        engine.check(GenerationRequest("a", (1, vocab + 2), 4, GREEDY, prompt_table=table))
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, {vocab}\)$"):
        engine.check(GenerationRequest("b", (1, vocab), 4, GREEDY))
    with pytest.raises(ValueError, match="prompt_embedding_table must be"):
        engine.check(GenerationRequest("c", (1, vocab), 4, GREEDY, prompt_table=np.zeros((2, hidden + 1), np.float32)))
