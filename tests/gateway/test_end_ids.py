"""A checkpoint with several end-of-sequence ids (Llama 3 Instruct ends its turns with <|eot_id|>, its documents
with <|end_of_text|>): the first is the generation model's end id, the others stop generation as stop words.
Whichever ends the answer, the end token is not part of the text nor of the count, and the finish reason is
"stop"; an end id the client gives to Triton directly is the client's alone (-1: never stop at an end token).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tokenizers import Tokenizer

from build_engines.repository import RepositorySettings, render_repository
from build_engines.tiny_checkpoints import TokenizerStyle
from cpu_engine import Engine, GenerationRequest, SamplingParams
from tests.gateway.conftest import GatewayThread, gateway_settings, model_entry
from tests.triton_client import StreamingClient
from triton_models import tensors as t
from triton_models.launcher import EmbeddedTriton

PROMPT = "The quick brown fox"
MODEL = "multi-end"


@dataclass(frozen=True)
class MultiEndModel:
    server: EmbeddedTriton
    checkpoint: Path
    answer_tokens: int  # greedy tokens before the second end id


def _second_end_id(checkpoint: Path) -> tuple[int, int]:
    """A token greedy decoding reaches after a few new ones: (its position, its id)."""
    prompt = tuple(Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(PROMPT).ids)
    request = GenerationRequest("probe", prompt, 12, SamplingParams(temperature=0.0))
    tokens = Engine.from_checkpoint(checkpoint).generate([request])["probe"].token_ids
    position = next(i for i in range(2, len(tokens)) if tokens[i] not in tokens[:i])
    return position, tokens[position]


@pytest.fixture(scope="module")
def multi_end_model(
    tiny_checkpoints: dict[TokenizerStyle, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MultiEndModel]:
    root = tmp_path_factory.mktemp("multi-end")
    checkpoint = shutil.copytree(tiny_checkpoints[TokenizerStyle.BYTE_BPE], root / "checkpoint")
    position, second = _second_end_id(checkpoint)
    generation_path = checkpoint / "generation_config.json"
    generation = json.loads(generation_path.read_text())
    first = generation["eos_token_id"]
    first = first[0] if isinstance(first, list) else first
    assert second != first
    generation["eos_token_id"] = [first, second]
    generation_path.write_text(json.dumps(generation))
    repository = render_repository(RepositorySettings(checkpoint_dir=str(checkpoint)), root / "repository")
    with EmbeddedTriton(repository, log_path=root / "triton.log") as server:
        yield MultiEndModel(server, checkpoint, position)


def _complete(model: MultiEndModel, max_tokens: int) -> list[dict[str, Any]]:
    """The JSON answer and the streamed events' final one, through a real gateway."""
    entry = model_entry(model.checkpoint, model.server.grpc_url, model_id=MODEL)
    body = {"model": MODEL, "prompt": PROMPT, "model_parameters": {"temperature": 0, "max_tokens": max_tokens}}

    async def ask(url: str) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v4/completions", json=body) as response:
                assert response.status == 200, await response.text()
                whole = await response.json()
            text, last = "", {}
            async with session.post(f"{url}/v4/completions", json={**body, "stream": True}) as response:
                async for line in response.content:
                    if line.startswith(b"data: "):
                        last = json.loads(line[len(b"data: ") :])
                        text += last["completion"]["text"]
            last["completion"]["text"] = text
            return [whole, last]

    with GatewayThread(gateway_settings([entry])) as running:
        return asyncio.run(ask(running.url))


def test_the_second_end_id_ends_the_answer_with_stop_and_is_not_counted(multi_end_model: MultiEndModel) -> None:
    n = multi_end_model.answer_tokens
    cut_by_length = _complete(multi_end_model, n)  # the same tokens, the end token not yet reached
    for answer in cut_by_length:
        assert answer["completion"]["finish_reason"] == "length"
        assert answer["token_usage"]["completion"] == n
    text = cut_by_length[0]["completion"]["text"]
    # With room for the end token, and with exactly one token of room (it used to read "length" there, the end
    # token counted as a completion token).
    for max_tokens in (40, n + 1):
        for answer in _complete(multi_end_model, max_tokens):
            assert answer["completion"]["finish_reason"] == "stop", (max_tokens, answer)
            assert answer["token_usage"]["completion"] == n, (max_tokens, answer)
            assert answer["completion"]["text"] == text


def test_an_end_id_given_to_triton_is_the_clients_alone(multi_end_model: MultiEndModel) -> None:
    client = StreamingClient(multi_end_model.server.grpc_url)
    try:
        n = multi_end_model.answer_tokens
        default = client.complete(PROMPT, n + 4, stream=True, request_id="default", top_k=1)
        assert default.error is None and default.tokens == n
        # -1: no end id at all, so neither end token stops it (the second one used to, as a stop word).
        ignoring = client.complete(PROMPT, n + 4, stream=True, request_id="ignore", top_k=1, **{t.END_ID: -1})
        assert ignoring.error is None
        assert ignoring.data.startswith(default.data) and len(ignoring.data) > len(default.data)
        # Every token came (one response each), the end token among them uncounted, as everywhere.
        assert len(ignoring.token_counts) >= n + 4 and ignoring.tokens == n + 3
    finally:
        client.close()
