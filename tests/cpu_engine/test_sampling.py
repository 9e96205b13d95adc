"""Sampling controls and stopping rules, on the tiny byte-level checkpoint (fast) unless noted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from build_engines.tiny_checkpoints import TokenizerStyle
from cpu_engine import Engine, FinishReason, GenerationRequest, SamplingParams
from cpu_engine.sampling import Sampler

PROMPT = (5, 100, 200, 300, 17, 40)


@pytest.fixture(scope="module")
def engine(tiny_checkpoints: dict[TokenizerStyle, Path]) -> Engine:
    return Engine.from_checkpoint(tiny_checkpoints[TokenizerStyle.BYTE_BPE])


def _run(engine: Engine, request_id: str = "r", **fields: object) -> tuple[list[int], FinishReason | None, list[float]]:
    request = GenerationRequest(request_id, PROMPT, **{"max_new_tokens": 32, **fields})  # type: ignore[arg-type]
    result = engine.generate([request])[request_id]
    return result.token_ids, result.finish_reason, result.log_probs


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine: Engine) -> None:
    params = SamplingParams(temperature=1.5, seed=1234)
    first, _, _ = _run(engine, sampling=params)
    again, _, _ = _run(engine, sampling=params)
    other, _, _ = _run(engine, sampling=SamplingParams(temperature=1.5, seed=99))
    assert first == again
    assert first != other


def test_top_k_one_equals_greedy(engine: Engine) -> None:
    greedy, _, _ = _run(engine, sampling=SamplingParams(temperature=0.0))
    for seed in (1, 2, 3):
        top1, _, _ = _run(engine, sampling=SamplingParams(temperature=1.0, top_k=1, seed=seed))
        assert top1 == greedy


def test_tiny_top_p_equals_greedy(engine: Engine) -> None:
    greedy, _, _ = _run(engine, sampling=SamplingParams(temperature=0.0))
    nucleus, _, _ = _run(engine, sampling=SamplingParams(temperature=1.0, top_p=1e-6, seed=5))
    assert nucleus == greedy


def test_a_vanishing_temperature_is_greedy_and_never_picks_a_masked_token() -> None:
    # 1e-38 / 1e-45 overflowed the division to inf, then NaN, and the draw returned the last candidate.
    for temperature in (1e-6, 1e-38, 1e-45):
        sampler = Sampler(SamplingParams(temperature=temperature, seed=0), 4, np.array([0]))
        assert sampler.choose(np.array([1, 5, 3, -np.inf], dtype=np.float32)) == 1, temperature


def test_top_k_draws_only_from_the_k_best() -> None:
    logits = np.linspace(-3, 3, 50).astype(np.float32)
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=3, seed=0), 50, np.array([0]))
    assert {sampler.choose(logits.copy()) for _ in range(300)} == {47, 48, 49}


def test_nucleus_keeps_the_smallest_set_reaching_p() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    kept = Sampler._nucleus(logits, np.arange(4), 0.79)
    assert sorted(kept.tolist()) == [0, 1]
    kept = Sampler._nucleus(logits, np.arange(4), 0.81)
    assert sorted(kept.tolist()) == [0, 1, 2]


def test_end_ids_stop_generation_and_are_not_output(engine: Engine) -> None:
    greedy, _, _ = _run(engine, sampling=SamplingParams(temperature=0.0))
    end_a, end_b = greedy[5], greedy[9]
    first_end = min(greedy.index(end_a), greedy.index(end_b))
    tokens, reason, _ = _run(engine, sampling=SamplingParams(temperature=0.0), end_ids=(end_b, end_a))
    assert reason is FinishReason.END_ID
    assert tokens == greedy[:first_end]


def test_min_tokens_masks_end_ids(engine: Engine) -> None:
    greedy, _, _ = _run(engine, sampling=SamplingParams(temperature=0.0))
    end = greedy[2]
    tokens, reason, _ = _run(engine, sampling=SamplingParams(temperature=0.0), end_ids=(end,), min_tokens=10)
    assert len(tokens) >= 10
    assert end not in tokens[:10]
    assert reason in (FinishReason.END_ID, FinishReason.LENGTH)


def test_stop_token_sequences_stop_after_the_sequence(engine: Engine) -> None:
    greedy, _, _ = _run(engine, sampling=SamplingParams(temperature=0.0))
    stop = tuple(greedy[6:8])
    tokens, reason, _ = _run(engine, sampling=SamplingParams(temperature=0.0), stop_sequences=((1, 2, 3), stop))
    assert reason is FinishReason.STOP_WORDS
    first = next(i for i in range(len(greedy) - 1) if tuple(greedy[i : i + 2]) == stop)
    assert tokens == greedy[: first + 2]


def test_bad_sequences_are_never_generated(engine: Engine) -> None:
    greedy, _, _ = _run(engine, sampling=SamplingParams(temperature=0.0))
    banned_single = greedy[0]
    banned_pair = tuple(greedy[3:5])
    tokens, _, _ = _run(engine, sampling=SamplingParams(temperature=0.0), bad_sequences=((banned_single,), banned_pair))
    assert banned_single not in tokens
    assert all(tuple(tokens[i : i + 2]) != banned_pair for i in range(len(tokens) - 1))
    assert tokens != greedy


def test_max_new_tokens_is_exact_and_reports_length(engine: Engine) -> None:
    tokens, reason, _ = _run(engine, sampling=SamplingParams(temperature=0.0), max_new_tokens=7)
    assert len(tokens) == 7
    assert reason is FinishReason.LENGTH


def test_presence_penalty_prevents_repeats(engine: Engine) -> None:
    greedy, _, _ = _run(engine, sampling=SamplingParams(temperature=0.0))
    assert len(set(greedy)) < len(greedy)  # the tiny model repeats itself when unpenalised
    penalised, _, _ = _run(engine, sampling=SamplingParams(temperature=0.0, presence_penalty=100.0))
    assert len(set(penalised)) == len(penalised)
    frequency, _, _ = _run(engine, sampling=SamplingParams(temperature=0.0, frequency_penalty=100.0))
    assert len(set(frequency)) == len(frequency)


def test_repetition_penalty_also_covers_prompt_tokens(engine: Engine) -> None:
    tokens, _, _ = _run(engine, sampling=SamplingParams(temperature=0.0, repetition_penalty=100.0))
    assert not set(tokens) & set(PROMPT)
    assert len(set(tokens)) == len(tokens)


def test_log_probs_are_those_of_the_model(engine: Engine) -> None:
    tokens, _, log_probs = _run(
        engine, sampling=SamplingParams(temperature=0.0), return_log_probs=True, max_new_tokens=4
    )
    assert len(log_probs) == 4
    from cpu_engine.kv_cache import SequenceKVCache
    from cpu_engine.model import Segment

    cache = SequenceKVCache(engine.config, 16)
    logits = engine.model.forward([Segment(cache, np.array(PROMPT))])[0].astype(np.float64)
    expected = logits[tokens[0]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert log_probs[0] == pytest.approx(expected, abs=1e-5)
    assert all(lp <= 0 for lp in log_probs)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(temperature=-1), "temperature"),
        (SamplingParams(top_k=-2), "top_k"),
        (SamplingParams(top_p=0), "top_p"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(repetition_penalty=0), "repetition_penalty"),
        (SamplingParams(presence_penalty=1000), "presence_penalty"),
        (SamplingParams(seed=-1), "seed"),
    ],
)
def test_out_of_range_sampling_is_refused_naming_the_field(engine: Engine, params: SamplingParams, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        engine.submit(GenerationRequest("bad", PROMPT, 4, params))
    assert not engine.has_work()
