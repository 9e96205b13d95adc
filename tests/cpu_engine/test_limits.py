"""Bounded memory and clear refusals: what cannot fit is refused before anything is allocated."""

from __future__ import annotations

from pathlib import Path

import pytest

from build_engines.tiny_checkpoints import TokenizerStyle
from cpu_engine import (
    Engine,
    EngineLimits,
    EngineOverloaded,
    FinishReason,
    GenerationRequest,
    RequestTooLarge,
    SamplingParams,
)

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
def checkpoint(tiny_checkpoints: dict[TokenizerStyle, Path]) -> Path:
    return tiny_checkpoints[TokenizerStyle.BYTE_BPE]


def test_prompt_plus_max_tokens_over_the_context_is_refused_with_both_numbers(checkpoint: Path) -> None:
    engine = Engine.from_checkpoint(checkpoint)  # the tiny models have a 512-token context
    with pytest.raises(RequestTooLarge, match=r"prompt \(100 tokens\) \+ max new tokens \(413\) = 513.*512"):
        engine.submit(GenerationRequest("r", tuple(range(100)), 413, GREEDY))
    assert not engine.has_work()


def test_request_over_the_kv_budget_is_refused_and_others_still_run(checkpoint: Path) -> None:
    engine = Engine.from_checkpoint(checkpoint, EngineLimits(max_batch_size=4, max_kv_tokens=64))
    with pytest.raises(RequestTooLarge, match="KV-cache budget of 64 tokens"):
        engine.submit(GenerationRequest("big", tuple(range(40)), 30, GREEDY))
    result = engine.generate([GenerationRequest("ok", (5, 6, 7), 8, GREEDY)])
    assert len(result["ok"].token_ids) == 8


def test_kv_budget_bounds_how_many_sequences_run_at_once(checkpoint: Path) -> None:
    # Each request reserves 4 + 12 = 16 tokens: a 40-token budget holds two at a time.
    engine = Engine.from_checkpoint(checkpoint, EngineLimits(max_batch_size=8, max_kv_tokens=40))
    requests = [GenerationRequest(f"r{i}", (5, 6, 7, 8 + i), 12, GREEDY) for i in range(5)]
    for request in requests:
        engine.submit(request)
    most = 0
    finished = set()
    while engine.has_work():
        for event in engine.step():
            if event.finished:
                finished.add(event.request_id)
        stats = engine.stats()
        most = max(most, stats.active_sequences)
        assert stats.kv_tokens_reserved <= 40
        assert stats.kv_tokens_in_use <= stats.kv_tokens_reserved
    assert most == 2
    assert finished == {r.request_id for r in requests}
    assert engine.stats().kv_tokens_reserved == 0


def test_full_wait_queue_refuses_new_requests(checkpoint: Path) -> None:
    engine = Engine.from_checkpoint(checkpoint, EngineLimits(max_batch_size=1, max_num_tokens=4, max_queue_size=2))
    engine.submit(GenerationRequest("a", (5,), 4, GREEDY))
    engine.submit(GenerationRequest("b", (5,), 4, GREEDY))
    with pytest.raises(EngineOverloaded, match="queue is full"):
        engine.submit(GenerationRequest("c", (5,), 4, GREEDY))


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"prompt_ids": ()}, "input_ids: the prompt is empty"),
        ({"prompt_ids": (5, 99999)}, "input_ids: token ids must be in"),
        ({"prompt_ids": (-1,)}, "input_ids: token ids must be in"),
        ({"max_new_tokens": 0}, "request_output_len must be >= 1"),
        ({"stop_sequences": ((),)}, "stop_words_list"),
        ({"bad_sequences": ((70000,),)}, "bad_words_list"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"end_ids": (2, 70000), "min_tokens": 1}, r"end_id: token ids must be in \[0, 512\)"),  # found by review
    ],
)
def test_malformed_requests_name_the_field(checkpoint: Path, request_fields: dict[str, object], message: str) -> None:
    engine = Engine.from_checkpoint(checkpoint)
    fields: dict[str, object] = {"request_id": "r", "prompt_ids": (5, 6), "max_new_tokens": 4, **request_fields}
    with pytest.raises(ValueError, match=message):
        engine.submit(GenerationRequest(**fields))  # type: ignore[arg-type]


def test_an_invalid_request_in_generate_queues_none_of_them(checkpoint: Path) -> None:
    engine = Engine.from_checkpoint(checkpoint)
    good, bad = GenerationRequest("good", (5, 6), 4, GREEDY), GenerationRequest("bad", (5, 6), 0, GREEDY)
    with pytest.raises(ValueError, match="request_output_len"):
        engine.generate([good, bad])
    assert not engine.has_work()  # "good" was left queued, and the next call failed on it
    assert len(engine.generate([good])["good"].token_ids) == 4


def test_a_batch_refused_while_queueing_leaves_nothing_behind(checkpoint: Path) -> None:
    """A full wait queue or an id used twice is only found while queueing: what was queued is taken back."""
    engine = Engine.from_checkpoint(checkpoint, EngineLimits(max_queue_size=2))
    with pytest.raises(EngineOverloaded, match="wait queue is full"):
        engine.generate(GenerationRequest(f"r{i}", (5, 6), 4, GREEDY) for i in range(3))
    assert not engine.has_work()
    with pytest.raises(ValueError, match="already in use"):
        engine.generate([GenerationRequest("same", (5, 6), 4, GREEDY), GenerationRequest("same", (5, 6), 4, GREEDY)])
    assert not engine.has_work()
    assert len(engine.generate([GenerationRequest("same", (5, 6), 4, GREEDY)])["same"].token_ids) == 4


def test_duplicate_request_id_is_refused(checkpoint: Path) -> None:
    engine = Engine.from_checkpoint(checkpoint)
    engine.submit(GenerationRequest("same", (5, 6), 4, GREEDY))
    with pytest.raises(ValueError, match="already in use"):
        engine.submit(GenerationRequest("same", (5, 6), 4, GREEDY))


def test_cancel_stops_a_running_sequence_at_the_next_step_and_frees_its_cache(checkpoint: Path) -> None:
    engine = Engine.from_checkpoint(checkpoint)
    engine.submit(GenerationRequest("long", (5, 6, 7), 200, GREEDY))
    engine.submit(GenerationRequest("other", (8, 9), 20, GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.stats().active_sequences == 2
    assert engine.cancel("long")
    events = engine.step()
    long_events = [e for e in events if e.request_id == "long"]
    assert len(long_events) == 1
    assert long_events[0].finish_reason is FinishReason.CANCELLED and long_events[0].token_ids == []
    assert engine.stats().active_sequences == 1
    assert not engine.cancel("long")  # already gone
    while engine.has_work():
        engine.step()
    stats = engine.stats()
    assert (stats.active_sequences, stats.kv_tokens_reserved, stats.queued_requests) == (0, 0, 0)


def test_cancel_removes_a_queued_request(checkpoint: Path) -> None:
    engine = Engine.from_checkpoint(checkpoint, EngineLimits(max_batch_size=1, max_num_tokens=4))
    engine.submit(GenerationRequest("first", (5,), 10, GREEDY))
    engine.submit(GenerationRequest("queued", (6,), 10, GREEDY))
    engine.step()
    assert engine.stats().queued_requests == 1
    assert engine.cancel("queued")
    events = engine.step()
    assert any(e.request_id == "queued" and e.finish_reason is FinishReason.CANCELLED for e in events)
    assert engine.stats().queued_requests == 0


def test_generated_token_counter_counts_every_output_token(checkpoint: Path) -> None:
    engine = Engine.from_checkpoint(checkpoint)
    results = engine.generate([GenerationRequest(f"r{i}", (5, 6 + i), 5 + i, GREEDY) for i in range(3)])
    assert engine.stats().generated_tokens_total == sum(len(r.token_ids) for r in results.values()) == 18


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_num_tokens must be >= max_batch_size"):
        EngineLimits(max_batch_size=32, max_num_tokens=16).validate()
    with pytest.raises(ValueError, match="max_kv_tokens"):
        EngineLimits(max_kv_tokens=0).validate()
