"""The official scale-gp SDK, unchanged, against the real stack (gateway → Triton → CPU engine)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import scale_gp

from tests.gateway.conftest import MODEL, RunningGateway
from tests.prompts import SMOLLM_CHAT, VARIED_PROMPTS

FRANCE = SMOLLM_CHAT.format("What is the capital of France?")
GREEDY = {"temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def sdk(gateway: RunningGateway) -> Iterator[scale_gp.SGPClient]:
    client = scale_gp.SGPClient(base_url=gateway.url, api_key="test-key", max_retries=0)
    yield client
    client.close()


def _streamed_text(sdk: scale_gp.SGPClient, prompt: str, parameters: dict[str, object]) -> tuple[str, list[dict]]:
    stream = sdk.completions.create(model=MODEL, prompt=prompt, model_parameters=parameters, stream=True)
    # The SDK types stream events with a legacy class that does not declare the spec's fields, so it hands
    # them over as plain data: read them as dicts.
    events = [event.to_dict() for event in stream]
    return "".join(e["completion"]["text"] for e in events), events


def test_sdk_creates_a_completion(sdk: scale_gp.SGPClient) -> None:
    response = sdk.completions.create(model=MODEL, prompt=FRANCE, model_parameters=GREEDY)
    assert "Paris" in response.completion.text
    assert response.completion.finish_reason == "stop"
    usage = response.token_usage
    assert usage is not None and usage.prompt == 16 and usage.total == usage.prompt + usage.completion


def test_sdk_streams_and_the_pieces_equal_the_whole(sdk: scale_gp.SGPClient) -> None:
    whole = sdk.completions.create(model=MODEL, prompt=FRANCE, model_parameters=GREEDY)
    text, events = _streamed_text(sdk, FRANCE, GREEDY)
    assert text == whole.completion.text
    assert len(events) > 3
    assert all(e["completion"]["finish_reason"] is None and e["token_usage"] is None for e in events[:-1])
    assert events[-1]["completion"]["finish_reason"] == whole.completion.finish_reason
    assert whole.token_usage is not None
    assert events[-1]["token_usage"] == whole.token_usage.to_dict()


@pytest.mark.parametrize(
    ("kind", "prompt"),
    [
        ("ascii", VARIED_PROMPTS[1]),
        ("accented", VARIED_PROMPTS[4]),
        ("cjk", "日本の首都は"),
        ("emoji", SMOLLM_CHAT.format("Reply with three emoji that describe happiness.")),
        ("emoji-mixed", "My favourite emoji are 😀 😃 😄"),
    ],
)
def test_streamed_text_is_byte_identical_for_every_script(sdk: scale_gp.SGPClient, kind: str, prompt: str) -> None:
    whole = sdk.completions.create(model=MODEL, prompt=prompt, model_parameters=GREEDY).completion.text
    streamed, _ = _streamed_text(sdk, prompt, GREEDY)
    assert streamed.encode() == whole.encode()
    assert "\ufffd" not in whole
    if kind == "ascii":
        assert whole.isascii()
    else:
        assert not whole.isascii(), f"the {kind} continuation has no multi-byte characters: {whole!r}"


def test_finish_reason_is_length_exactly_when_max_tokens_is_reached(sdk: scale_gp.SGPClient) -> None:
    cut = sdk.completions.create(model=MODEL, prompt=FRANCE, model_parameters={"temperature": 0.0, "max_tokens": 3})
    assert cut.completion.finish_reason == "length"
    assert cut.token_usage is not None and cut.token_usage.completion == 3
    natural = sdk.completions.create(
        model=MODEL, prompt=FRANCE, model_parameters={"temperature": 0.0, "max_tokens": 40}
    )
    assert natural.completion.finish_reason == "stop"
    assert natural.token_usage is not None and natural.token_usage.completion < 40


def test_stop_sequence_cuts_before_its_first_occurrence_even_inside_a_token(sdk: scale_gp.SGPClient) -> None:
    # " Paris" is one token: "ari" starts inside it.
    parameters = {"temperature": 0.0, "max_tokens": 24, "stop_sequences": ["ari", "zzz"]}
    whole = sdk.completions.create(model=MODEL, prompt=FRANCE, model_parameters=parameters)
    assert whole.completion.text == "The capital of France is P"
    assert whole.completion.finish_reason == "stop"
    streamed, events = _streamed_text(sdk, FRANCE, parameters)
    assert streamed == "The capital of France is P"
    assert events[-1]["completion"]["finish_reason"] == "stop"


def test_stop_sequence_spanning_several_tokens(sdk: scale_gp.SGPClient) -> None:
    parameters = {"temperature": 0.0, "max_tokens": 24, "stop_sequences": ["France is"]}
    text, _ = _streamed_text(sdk, FRANCE, parameters)
    assert text == "The capital of "


def test_sampling_parameters_and_aliases_are_accepted(sdk: scale_gp.SGPClient) -> None:
    parameters = {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "presence_penalty": 0.5, "frequency_penalty": 0.5}
    response = sdk.completions.create(model=MODEL, prompt=FRANCE, model_parameters={**parameters, "max_tokens": 8})
    assert response.token_usage is not None and 1 <= response.token_usage.completion <= 8


def test_sdk_maps_errors_to_its_typed_exceptions(sdk: scale_gp.SGPClient) -> None:
    with pytest.raises(scale_gp.NotFoundError, match="no-such-model"):
        sdk.completions.create(model="no-such-model", prompt="hi")
    with pytest.raises(scale_gp.BadRequestError, match="stop_sequences"):
        sdk.completions.create(model=MODEL, prompt="hi", model_parameters={"stop_sequences": ["a", "b", "c", "d", "e"]})
