"""The echo generation model (benchmarks' stand-in for generation) answers every request with an end: an empty
prompt or nothing to generate is an error, never a stream without its final response."""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from build_engines.repository import RepositorySettings, render_repository
from build_engines.tiny_checkpoints import TokenizerStyle
from tests.triton_client import StreamingClient, infer_input
from triton_models import tensors as t
from triton_models.launcher import EmbeddedTriton


@pytest.fixture(scope="module")
def echo(tiny_checkpoints: dict[TokenizerStyle, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("echo")
    settings = RepositorySettings(
        checkpoint_dir=str(tiny_checkpoints[TokenizerStyle.BYTE_BPE]), generation_model=t.ECHO_LLM
    )
    rendered = render_repository(settings, root / "rendered")
    shutil.copytree(rendered / t.ECHO_LLM, root / "repository" / t.ECHO_LLM)
    with EmbeddedTriton(root / "repository", log_path=root / "triton.log") as server:
        yield server.grpc_url


def _echo(url: str, prompt: list[int], output_len: int) -> tuple[list[int], str | None]:
    client = StreamingClient(url)
    try:
        inputs = [
            infer_input(t.INPUT_IDS, np.array(prompt, dtype=np.int32)),
            infer_input(t.INPUT_LENGTHS, np.int32(len(prompt))),
            infer_input(t.REQUEST_OUTPUT_LEN, np.int32(output_len)),
            infer_input(t.STREAMING, np.bool_(True)),
        ]
        client.send(t.ECHO_LLM, inputs, "e")
        tokens: list[int] = []
        while True:
            result, error = client.responses.get(timeout=10)  # a missing final response fails here, not hangs
            if error is not None:
                return tokens, str(error)
            ids = result.as_numpy(t.OUTPUT_IDS)
            if ids is not None:
                tokens += [int(i) for i in ids.reshape(-1)]
            if result.get_response().parameters["triton_final_response"].bool_param:
                return tokens, None
    finally:
        client.close()


def test_echo_streams_the_prompt_back_and_ends(echo: str) -> None:
    assert _echo(echo, [5, 6, 7], 5) == ([5, 6, 7, 5, 6], None)


@pytest.mark.parametrize(("prompt", "output_len", "message"), [([5, 6], 0, "request_output_len must be >= 1"),
                                                                ([], 3, "input_ids' is empty")])  # fmt: skip
def test_nothing_to_echo_is_an_error_with_an_end(echo: str, prompt: list[int], output_len: int, message: str) -> None:
    tokens, error = _echo(echo, prompt, output_len)
    assert tokens == [] and error is not None and message in error


@pytest.fixture(scope="module")
def echo_ensemble(
    tiny_checkpoints: dict[TokenizerStyle, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedTriton]:
    """The whole ensemble with the echo model generating: the output is the prompt's own tokens."""
    root = tmp_path_factory.mktemp("echo-ensemble")
    settings = RepositorySettings(
        checkpoint_dir=str(tiny_checkpoints[TokenizerStyle.BYTE_BPE]), generation_model=t.ECHO_LLM
    )
    with EmbeddedTriton(render_repository(settings, root / "repository"), log_path=root / "triton.log") as server:
        yield server


def test_generate_stream_answers_valid_json_when_characters_span_tokens(
    echo_ensemble: EmbeddedTriton, tiny_checkpoints: dict[TokenizerStyle, Path]
) -> None:
    """Byte-level tokens split CJK and emoji: each streamed event is still valid UTF-8 JSON (text_output is
    valid text, as NVIDIA's postprocessing gives), and text_output_bytes concatenates to the exact text."""
    prompt = "日本 😀 café"
    tokenizer = Tokenizer.from_file(str(tiny_checkpoints[TokenizerStyle.BYTE_BPE] / "tokenizer.json"))
    tokens = len(tokenizer.encode(prompt, add_special_tokens=False).ids)
    assert tokens > len(prompt)  # characters do span tokens
    events = []
    for stream in (True, False):
        body = json.dumps({"text_input": prompt, "max_tokens": tokens, "stream": stream}).encode()
        endpoint = "generate_stream" if stream else "generate"
        request = urllib.request.Request(
            f"{echo_ensemble.http_url}/v2/models/{t.ENSEMBLE}/{endpoint}", data=body,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
        lines = [line[len(b"data: ") :] for line in raw.splitlines() if line.startswith(b"data: ")] if stream else [raw]
        events.append([json.loads(line.decode("utf-8")) for line in lines])  # strict UTF-8, valid JSON
    streamed, whole = events
    assert len(streamed) > 1
    assert b"".join(_json_bytes(event[t.TEXT_BYTES_OUTPUT]) for event in streamed).decode("utf-8") == prompt
    assert whole[0][t.TEXT_OUTPUT] == prompt and _json_bytes(whole[0][t.TEXT_BYTES_OUTPUT]).decode("utf-8") == prompt


def _json_bytes(value: int | list[int]) -> bytes:
    """Triton's generate endpoints give a one-element tensor as a bare number, a longer one as a list."""
    return bytes([value] if isinstance(value, int) else value)
