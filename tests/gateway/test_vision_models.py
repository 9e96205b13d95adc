"""Image-based completions end to end: a tiny random LLaVA checkpoint served by the whole stack (gateway →
ensemble: preprocessing + multimodal_encoders → cpu_llm with a prompt table → postprocessing) gives the greedy
tokens of transformers' LlavaForConditionalGeneration on the same checkpoint and images."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image as PilImage
from tokenizers import Tokenizer

from build_engines.repository import RepositorySettings, render_repository
from cpu_engine import ModelConfig
from gateway.settings import ModelEntry
from tests.gateway.conftest import GatewayThread, RunningGateway, gateway_settings
from tests.llava_checkpoints import hf_llava_greedy, reference_llava, write_tiny_llava
from triton_models import tensors as t
from triton_models.launcher import EmbeddedTriton
from triton_models.preprocessing import TokenizerFacts, preprocess
from triton_models.token_bytes import TokenBytes

pytestmark = pytest.mark.transformers

MODEL = "tiny-llava"
NEW_TOKENS = 24


def _image(kind: str, size: tuple[int, int], seed: int) -> bytes:
    """A deterministic picture with structure (a gradient and a block), encoded as PNG or JPEG."""
    width, height = size
    picture = PilImage.new("RGB", size)
    picture.putdata(
        [
            ((x * 255 // width + seed * 40) % 256, (y * 255 // height) % 256, (x * y + seed * 90) % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    buffer = io.BytesIO()
    picture.save(buffer, format=kind)
    return buffer.getvalue()


IMAGES = [_image("PNG", (40, 30), 1), _image("JPEG", (30, 50), 2)]
MIME = ["image/png", "image/jpeg"]


def _data_url(index: int) -> str:
    return f"data:{MIME[index]};base64,{base64.b64encode(IMAGES[index]).decode()}"


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("llava") / "checkpoint", seed=0)


@pytest.fixture(scope="module")
def gateway(llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    root = tmp_path_factory.mktemp("llava-triton")
    repository = render_repository(RepositorySettings(checkpoint_dir=str(llava)), root / "repository")
    assert (repository / t.MULTIMODAL_ENCODERS / "config.pbtxt").is_file()  # rendered for the vision checkpoint
    entry = ModelEntry(
        id=MODEL, tokenizer_dir=llava, context_length=ModelConfig.from_checkpoint(llava).max_position_embeddings,
        endpoints=["placeholder:1"], accepts_images=True,
    )  # fmt: skip
    with EmbeddedTriton(repository, log_path=root / "triton.log") as server:
        settings = gateway_settings([entry.model_copy(update={"endpoints": [server.grpc_url]})])
        with GatewayThread(settings) as running:
            yield running


@pytest.fixture(scope="module")
def reference(llava: Path) -> tuple[Any, Any]:
    return reference_llava(llava)


def _complete(url: str, prompt: str, images: list[str]) -> tuple[int, Any]:
    async def run() -> tuple[int, Any]:
        body: dict[str, Any] = {"model": MODEL, "prompt": prompt,
                                "model_parameters": {"max_tokens": NEW_TOKENS, "temperature": 0}}  # fmt: skip
        if images:
            body["images"] = [{"image_url": url_} for url_ in images]
        async with aiohttp.ClientSession() as session, session.post(f"{url}/v4/completions", json=body) as response:
            return response.status, await response.json()

    return asyncio.run(run())


def _expected(llava: Path, reference: tuple[Any, Any], prompt: str, images: list[int]) -> tuple[str, int]:
    """(transformers' greedy text as the stack serves it, the prompt's token count with the image tokens)."""
    model, processor = reference
    pictures = [PilImage.open(io.BytesIO(IMAGES[i])) for i in images]
    ids = hf_llava_greedy(model, processor, prompt, pictures, NEW_TOKENS)
    prompt_tokens = processor(images=pictures or None, text=prompt, return_tensors="pt")["input_ids"].shape[1]
    eos = json.loads((llava / "generation_config.json").read_text())["eos_token_id"]
    end_ids = set(eos if isinstance(eos, list) else [eos])
    cut = next((i for i, token in enumerate(ids) if token in end_ids), len(ids))
    tokenizer = Tokenizer.from_file(str(llava / "tokenizer.json"))
    return TokenBytes(tokenizer).join(ids[:cut]).decode("utf-8", errors="replace"), prompt_tokens


@pytest.mark.parametrize(
    ("prompt", "images"),
    [
        ("USER: <image>\nWhat is in the picture? ASSISTANT:", [0]),
        ("USER: <image>\n<image>\nHow do these two differ? ASSISTANT:", [0, 1]),
        ("USER: <image>\n<image>\nHow do these two differ? ASSISTANT:", [1, 0]),
    ],
    ids=["one image", "two images", "two images swapped"],
)
def test_greedy_tokens_equal_transformers_llava(
    gateway: RunningGateway, llava: Path, reference: tuple[Any, Any], prompt: str, images: list[int]
) -> None:
    status, body = _complete(gateway.url, prompt, [_data_url(i) for i in images])
    assert status == 200, body
    text, prompt_tokens = _expected(llava, reference, prompt, images)
    assert body["completion"]["text"] == text
    assert body["token_usage"]["prompt"] == prompt_tokens  # the image tokens are counted


def test_images_without_placeholders_go_in_front_and_text_only_requests_still_work(
    gateway: RunningGateway, llava: Path, reference: tuple[Any, Any]
) -> None:
    status, body = _complete(gateway.url, "Describe it.", [_data_url(1)])
    assert status == 200, body
    assert body["completion"]["text"] == _expected(llava, reference, "<image>\nDescribe it.", [1])[0]
    status, body = _complete(gateway.url, "USER: Hello ASSISTANT:", [])
    assert status == 200, body
    assert body["completion"]["text"] == _expected(llava, reference, "USER: Hello ASSISTANT:", [])[0]
    # Different images, different answers: the features really reach the language model.
    answers = {_complete(gateway.url, "USER: <image>\nWhat? ASSISTANT:", [_data_url(i)])[1]["completion"]["text"]
               for i in (0, 1)}  # fmt: skip
    assert len(answers) == 2


def test_text_only_requests_send_the_generation_model_no_prompt_table(llava: Path) -> None:
    # Absent, not a zero-row table (the end-to-end test above shows the ensemble passes the absence on).
    outputs = preprocess(TokenizerFacts(llava), "USER: Hello ASSISTANT:", [], [], None)
    assert t.PRE_INPUT_ID in outputs
    assert t.PRE_PROMPT_EMBEDDING_TABLE not in outputs and t.PRE_PROMPT_VOCAB_SIZE not in outputs


def test_refused_images_and_placeholder_mismatches_are_clear_400s(gateway: RunningGateway) -> None:
    status, body = _complete(gateway.url, "<image> and <image>", [_data_url(0)])
    assert (
        status == 400
        and body["error"]["param"] == "prompt"
        and "2 <image> placeholders for 1 images" in body["error"]["message"]
    )
    status, body = _complete(gateway.url, "Look.", [_data_url(0), "http://127.0.0.1:9/x.png"])
    assert status == 400 and body["error"]["param"] == "images[1].image_url"
    assert "loopback" in body["error"]["message"]
    status, body = _complete(gateway.url, "Look.", ["data:image/png;base64,AAAA"])
    assert status == 400 and body["error"]["param"] == "images[0].image_url"


def test_the_request_deadline_covers_fetching_its_images(llava: Path) -> None:
    # A host that accepts the connection and never answers: only the request's own deadline can end the wait.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/x.png"
        entry = ModelEntry(
            id=MODEL, tokenizer_dir=llava, context_length=ModelConfig.from_checkpoint(llava).max_position_embeddings,
            endpoints=["127.0.0.1:9"], accepts_images=True,
        )  # fmt: skip
        settings = gateway_settings([entry], image_fetch_allowed_networks=["127.0.0.0/8"])
        with GatewayThread(settings) as running:

            async def run() -> tuple[int, Any, float]:
                body = {"model": MODEL, "prompt": "Look.", "images": [{"image_url": url}]}
                started = time.monotonic()
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(
                        f"{running.url}/v4/completions", json=body, headers={"x-request-timeout": "0.5"}
                    ) as response,
                ):
                    return response.status, await response.json(), time.monotonic() - started

            status, body, elapsed = asyncio.run(run())
    assert status == 504 and body["error"]["type"] == "timeout" and elapsed < 5  # not the 10 s fetch timeout
