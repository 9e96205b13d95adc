"""The rendered CPU repository in a real Triton server, called over gRPC streaming with tritonclient."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from build_engines.tiny_checkpoints import TokenizerStyle
from cpu_engine import Engine, GenerationRequest, SamplingParams
from tests.prompts import SMOLLM_CHAT, VARIED_PROMPTS
from tests.triton_client import StreamingClient, ensemble_inputs, infer_input, metric_value, wait_for_metric
from triton_models import tensors as t
from triton_models.launcher import EmbeddedTriton
from triton_models.token_bytes import TokenBytes

FRANCE = SMOLLM_CHAT.format("What is the capital of France?")


@pytest.fixture
def client(reference_triton: EmbeddedTriton) -> Iterator[StreamingClient]:
    stream = StreamingClient(reference_triton.grpc_url)
    yield stream
    stream.close()


def test_smollm2_answers_the_capital_of_france(client: StreamingClient) -> None:
    completion = client.complete(FRANCE, 24, stream=False, temperature=0.0)
    assert completion.error is None
    assert "Paris" in completion.text


def test_greedy_text_equals_the_engines_own_result(
    client: StreamingClient, reference_checkpoint: Path, reference_engine: Engine
) -> None:
    tokenizer = Tokenizer.from_file(str(reference_checkpoint / "tokenizer.json"))
    prompt = VARIED_PROMPTS[1]
    request = GenerationRequest(
        "direct", tuple(tokenizer.encode(prompt).ids), 20, SamplingParams(temperature=0.0), (2,)
    )
    expected = reference_engine.generate([request])["direct"].token_ids
    completion = client.complete(prompt, 20, stream=False, temperature=0.0)
    assert completion.data == TokenBytes(tokenizer).join(expected)
    assert completion.tokens == len(expected)


@pytest.mark.parametrize("prompt", [VARIED_PROMPTS[5], SMOLLM_CHAT.format("Write one sentence in French about café.")])
def test_streamed_pieces_concatenate_to_the_full_text_multibyte(client: StreamingClient, prompt: str) -> None:
    whole = client.complete(prompt, 24, stream=False, temperature=0.0)
    streamed = client.complete(prompt, 24, stream=True, temperature=0.0)
    assert len(streamed.pieces) > 5
    assert streamed.data == whole.data
    assert not whole.data.isascii()  # the continuation really has multi-byte characters
    assert "\ufffd" not in whole.data.decode("utf-8")


def test_streaming_is_exact_for_both_tiny_tokenizer_styles(tiny_tritons: dict[TokenizerStyle, EmbeddedTriton]) -> None:
    for style, server in tiny_tritons.items():
        stream = StreamingClient(server.grpc_url)
        try:
            split_characters = 0
            for prompt in ("Hello world", "東京 café 🚀", "The quick brown fox"):
                whole = stream.complete(prompt, 40, stream=False, temperature=0.0)
                streamed = stream.complete(prompt, 40, stream=True, temperature=0.0)
                assert streamed.data == whole.data, (style, prompt)
                # Random weights pick byte tokens and multi-byte merges: some piece must end mid-character.
                split_characters += sum(1 for p in streamed.pieces if p and not _is_complete_utf8(p))
            assert split_characters > 0, style
        finally:
            stream.close()


def _is_complete_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_sixteen_concurrent_streams_each_equal_their_solo_result(client: StreamingClient) -> None:
    prompts = [SMOLLM_CHAT.format(q) for q in ("Name a fruit.", "Name a color.", "Count to five.", "Say hi.")]
    prompts += VARIED_PROMPTS
    prompts += [f"Number {i} is" for i in range(16 - len(prompts))]
    solo = [client.complete(p, 12, stream=True, temperature=0.0, request_id=f"solo{i}") for i, p in enumerate(prompts)]
    for i, prompt in enumerate(prompts):
        client.send(t.ENSEMBLE, ensemble_inputs(prompt, 12, True, temperature=0.0), f"together{i}")
    together = client.collect({f"together{i}" for i in range(len(prompts))})
    assert len(prompts) == 16
    for i in range(len(prompts)):
        assert together[f"together{i}"].data == solo[i].data, prompts[i]


def _stop_inputs() -> list:
    return [
        infer_input(t.INPUT_IDS, np.array([0], dtype=np.int32)),
        infer_input(t.INPUT_LENGTHS, np.int32(1)),
        infer_input(t.REQUEST_OUTPUT_LEN, np.int32(1)),
        infer_input(t.STOP, np.bool_(True)),
    ]


def test_stop_request_ends_a_running_generation_within_a_step(
    client: StreamingClient, reference_triton: EmbeddedTriton
) -> None:
    metrics = reference_triton.metrics_url
    client.send(t.ENSEMBLE, ensemble_inputs(VARIED_PROMPTS[1], 400, True, temperature=0.0), "long-one")
    for _ in range(5):
        _, error = client.responses.get(timeout=60)
        assert error is None
    assert metric_value(metrics, "cpu_llm_active_sequences") >= 1
    stopper = StreamingClient(reference_triton.grpc_url)
    try:
        stopper.send(t.CPU_LLM, _stop_inputs(), "long-one")
        stopper.collect({"long-one"})  # the stop request itself is answered with an empty final response
    finally:
        stopper.close()
    generated_at_stop = metric_value(metrics, "cpu_llm_generated_tokens_total")
    rest = client.collect({"long-one"})["long-one"]
    assert rest.error is None
    time.sleep(0.3)
    # The engine spends at most the step that was in flight when the stop arrived.
    assert metric_value(metrics, "cpu_llm_generated_tokens_total") - generated_at_stop <= 1
    assert 5 + len(rest.token_counts) < 100  # far from the 400 tokens asked for
    wait_for_metric(metrics, "cpu_llm_active_sequences", 0, timeout_s=1.0)


def test_a_stop_request_without_a_request_id_is_refused(client: StreamingClient) -> None:
    # It would otherwise stop every request sent without an id (TensorRT-LLM's backend refuses it the same way).
    client.send(t.CPU_LLM, _stop_inputs(), "")
    refused = client.collect({""})[""]
    assert refused.error is not None and "request id must be provided" in refused.error


def test_temperature_without_top_k_or_top_p_is_greedy_as_in_tensorrt_llm(client: StreamingClient) -> None:
    greedy = client.complete(VARIED_PROMPTS[1], 12, stream=False, temperature=0.0)
    for seed in (1, 2):
        assert (
            client.complete(VARIED_PROMPTS[1], 12, stream=False, temperature=1.0, **{t.SEED: seed}).data == greedy.data
        )
    # With top_p (what the gateway sends when a request samples) the whole distribution is drawn from.
    sampled = [client.complete(VARIED_PROMPTS[1], 12, stream=False, temperature=1.0, top_p=1.0, **{t.SEED: s}).data
               for s in (1, 2, 3)]  # fmt: skip
    assert any(text != greedy.data for text in sampled)


def test_stop_words_end_generation(client: StreamingClient) -> None:
    free = client.complete(FRANCE, 24, stream=False, temperature=0.0)
    assert "Paris." in free.text
    # Token-id stop words match only where the word tokenizes the same alone as in context: " Paris"
    # (with its space) does here; text-level stop sequences are the gateway's job.
    stopped = client.complete(FRANCE, 24, stream=False, temperature=0.0, stop_words=["nothing like it", " Paris"])
    assert stopped.text.endswith(" Paris")  # TensorRT-LLM semantics: the stop word is the last output
    assert stopped.tokens < free.tokens


def test_max_tokens_is_respected(client: StreamingClient) -> None:
    for stream in (False, True):
        completion = client.complete(VARIED_PROMPTS[1], 5, stream=stream, temperature=0.0)
        assert completion.tokens == 5


def test_sampling_with_a_seed_is_reproducible_through_the_ensemble(client: StreamingClient) -> None:
    options = {"temperature": 1.0, "top_p": 0.9, t.SEED: 42}
    first = client.complete(VARIED_PROMPTS[1], 16, stream=True, **options)
    second = client.complete(VARIED_PROMPTS[1], 16, stream=True, **options)
    assert first.data == second.data


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(client: StreamingClient) -> None:
    empty = client.complete("", 5, stream=True, request_id="empty")
    assert empty.error is not None and "text_input" in empty.error
    too_long = client.complete("Hello", 9000, stream=True, request_id="too-long")
    assert too_long.error is not None and "exceeds the model's context length 8192" in too_long.error
    bad_top_p = client.complete("Hello", 5, stream=True, request_id="bad-top-p", top_p=1.5)
    assert bad_top_p.error is not None and "top_p" in bad_top_p.error
    assert "Paris" in client.complete(FRANCE, 24, stream=False, temperature=0.0).text


def test_triton_generate_stream_endpoint_works_on_the_ensemble(reference_triton: EmbeddedTriton) -> None:
    body = json.dumps({"text_input": FRANCE, "max_tokens": 24, "stream": True, "temperature": 0.0}).encode()
    request = urllib.request.Request(
        f"{reference_triton.http_url}/v2/models/ensemble/generate_stream",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        events = [line[len(b"data: ") :] for line in response.read().splitlines() if line.startswith(b"data: ")]
    pieces = [json.loads(event)["text_output"] for event in events]
    assert len(pieces) > 3
    assert "Paris" in "".join(pieces)


def test_engine_metrics_are_exported(reference_triton: EmbeddedTriton, client: StreamingClient) -> None:
    client.complete(VARIED_PROMPTS[1], 3, stream=False, temperature=0.0)
    assert metric_value(reference_triton.metrics_url, "cpu_llm_generated_tokens_total") >= 3
    # The metrics are published after each engine step, just after the responses of that step go out.
    wait_for_metric(reference_triton.metrics_url, "cpu_llm_kv_tokens_in_use", 0, timeout_s=1.0)
    wait_for_metric(reference_triton.metrics_url, "cpu_llm_queued_requests", 0, timeout_s=1.0)
