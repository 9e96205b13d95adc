"""The gateway against a model repository rendered by an earlier version of the project (deployments render it
once, at build time, and upgrade images later): before `text_output_bytes` existed, `text_output` carried the
exact bytes, and the gateway and postprocessing must both keep that meaning there."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from tokenizers import Tokenizer

from build_engines.repository import RepositorySettings, render_repository
from build_engines.tiny_checkpoints import TokenizerStyle
from tests.gateway.conftest import GatewayThread, gateway_settings, model_entry
from triton_models import tensors as t
from triton_models.launcher import EmbeddedTriton

# Characters that byte-level tokens split: a lossy text_output would show U+FFFD in the stream.
PROMPT = "日本 😀 café"


def _render_without_bytes_output(checkpoint: Path, out: Path) -> Path:
    """The repository as rendered before text_output_bytes: the same, less that output."""
    repository = render_repository(RepositorySettings(checkpoint_dir=str(checkpoint), generation_model=t.ECHO_LLM), out)
    removed = {
        t.POSTPROCESSING: f'  {{ name: "{t.POST_OUTPUT_BYTES}", data_type: TYPE_UINT8, dims: [ -1 ] }},\n',
        t.ENSEMBLE: f'  {{ name: "{t.TEXT_BYTES_OUTPUT}", data_type: TYPE_UINT8, dims: [ -1 ] }},\n'
        f'      output_map {{ key: "{t.POST_OUTPUT_BYTES}" value: "{t.TEXT_BYTES_OUTPUT}" }}\n',
    }
    for model, lines in removed.items():
        config = repository / model / "config.pbtxt"
        text = config.read_text()
        for line in lines.splitlines(keepends=True):
            assert line in text, (model, line)
            text = text.replace(line, "")
        config.write_text(text)
    return repository


@pytest.fixture(scope="module")
def earlier_repository(
    tiny_checkpoints: dict[TokenizerStyle, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedTriton]:
    root = tmp_path_factory.mktemp("earlier-repository")
    repository = _render_without_bytes_output(tiny_checkpoints[TokenizerStyle.BYTE_BPE], root / "repository")
    with EmbeddedTriton(repository, log_path=root / "triton.log") as server:
        yield server


def test_a_repository_rendered_before_the_bytes_output_still_streams_exact_text(
    earlier_repository: EmbeddedTriton, tiny_checkpoints: dict[TokenizerStyle, Path]
) -> None:
    checkpoint = tiny_checkpoints[TokenizerStyle.BYTE_BPE]
    entry = model_entry(checkpoint, earlier_repository.grpc_url, model_id="echo")
    entry = entry.model_copy(update={"generation_model": t.ECHO_LLM})
    tokens = len(Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(PROMPT).ids)
    body = {"model": "echo", "prompt": PROMPT, "model_parameters": {"temperature": 0, "max_tokens": tokens}}

    async def ask(url: str) -> tuple[str, str]:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/v4/completions", json=body) as response:
                assert response.status == 200, await response.text()
                whole = (await response.json())["completion"]["text"]
            streamed = ""
            async with session.post(f"{url}/v4/completions", json={**body, "stream": True}) as response:
                async for line in response.content:
                    if line.startswith(b"data: "):
                        streamed += json.loads(line[len(b"data: ") :])["completion"]["text"]
            return whole, streamed

    with GatewayThread(gateway_settings([entry])) as running:
        whole, streamed = asyncio.run(ask(running.url))
    assert whole == streamed == PROMPT  # the echo model's output is the prompt: no U+FFFD anywhere
