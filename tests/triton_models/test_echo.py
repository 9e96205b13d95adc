"""The echo generation model (benchmarks' stand-in for generation) answers every request with an end: an empty
prompt or nothing to generate is an error, never a stream without its final response."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

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
