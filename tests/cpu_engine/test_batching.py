"""In-flight batching gives every sequence exactly the tokens it gets alone."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from build_engines.tiny_checkpoints import TokenizerStyle
from cpu_engine import Engine, EngineLimits, GenerationRequest, SamplingParams
from tests.prompts import VARIED_PROMPTS

GREEDY = SamplingParams(temperature=0.0)


def _requests(tokenizer: Tokenizer, new_tokens: int = 24) -> list[GenerationRequest]:
    prompts = [tokenizer.encode(p).ids for p in VARIED_PROMPTS]
    assert len({len(p) for p in prompts}) >= 6  # genuinely different prompt lengths
    return [GenerationRequest(f"r{i}", tuple(p), new_tokens + i, GREEDY) for i, p in enumerate(prompts)]


def _solo(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    return {r.request_id: engine.generate([r])[r.request_id].token_ids for r in requests}


def test_eight_sequences_batched_equal_each_alone_on_smollm2(
    reference_checkpoint: Path, reference_engine: Engine
) -> None:
    requests = _requests(Tokenizer.from_file(str(reference_checkpoint / "tokenizer.json")))
    solo = _solo(reference_engine, requests)
    batched = reference_engine.generate(requests)
    assert {k: v.token_ids for k, v in batched.items()} == solo


def test_eight_sequences_batched_equal_each_alone_on_tiny(
    tiny_checkpoints: dict[TokenizerStyle, Path], tiny_style: TokenizerStyle
) -> None:
    checkpoint = tiny_checkpoints[tiny_style]
    engine = Engine.from_checkpoint(checkpoint)
    requests = _requests(Tokenizer.from_file(str(checkpoint / "tokenizer.json")))
    solo = _solo(engine, requests)
    assert {k: v.token_ids for k, v in engine.generate(requests).items()} == solo


def test_sequences_joining_between_decode_steps_and_chunked_prefill_change_nothing(
    tiny_checkpoints: dict[TokenizerStyle, Path],
) -> None:
    checkpoint = tiny_checkpoints[TokenizerStyle.BYTE_BPE]
    requests = _requests(Tokenizer.from_file(str(checkpoint / "tokenizer.json")))
    solo = _solo(Engine.from_checkpoint(checkpoint), requests)
    # Prompt chunks of at most 8 tokens per step, and a new request every 3 steps while others decode.
    engine = Engine.from_checkpoint(checkpoint, EngineLimits(max_batch_size=8, max_num_tokens=8))
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    pending = list(requests)
    steps = 0
    max_active = 0
    while pending or engine.has_work():
        if pending and steps % 3 == 0:
            engine.submit(pending.pop(0))
        for event in engine.step():
            outputs[event.request_id].extend(event.token_ids)
        max_active = max(max_active, engine.stats().active_sequences)
        steps += 1
    assert outputs == solo
    assert max_active >= 3  # requests really overlapped
