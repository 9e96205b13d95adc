"""A real gateway on a loopback port, in front of the session's real Triton server."""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from build_engines.reference_model import REFERENCE_MODEL_ID
from cpu_engine import ModelConfig
from gateway.app import init_app, start_site
from gateway.event_loop import loop_factory
from gateway.settings import GatewaySettings, ModelEntry
from triton_models import tensors as t
from triton_models.launcher import EmbeddedTriton, free_port

MODEL = REFERENCE_MODEL_ID


@dataclass
class RunningGateway:
    url: str
    settings: GatewaySettings
    loop: asyncio.AbstractEventLoop


class GatewayThread:
    """Runs the gateway's event loop in a thread, so sync clients (the SDK) and async ones can call it."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.loop = loop_factory(settings.event_loop)()  # the loop production runs on
        self.runner: web.AppRunner | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> RunningGateway:
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(
            start_site(init_app(self.settings), self.settings.host, self.settings.port), self.loop
        )
        self.runner = future.result(timeout=60)
        return RunningGateway(f"http://{self.settings.host}:{self.settings.port}", self.settings, self.loop)

    def __exit__(self, *_: object) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def model_entry(checkpoint: Path, endpoint: str, model_id: str = MODEL) -> ModelEntry:
    return ModelEntry(
        id=model_id,
        ensemble=t.ENSEMBLE,
        generation_model=t.CPU_LLM,
        tokenizer_dir=checkpoint,
        context_length=ModelConfig.from_checkpoint(checkpoint).max_position_embeddings,
        endpoints=[endpoint],
    )


def gateway_settings(models: list[ModelEntry], **overrides: object) -> GatewaySettings:
    """Settings for a test gateway on a free port, its usage ledger in a fresh folder."""
    overrides.setdefault("data_dir", Path(tempfile.mkdtemp(prefix="gateway-data-")))
    # No idle probes unless a test asks: they are real requests, and tests count Triton's requests and metrics.
    overrides.setdefault("replica_probe_interval_s", 3600.0)
    return GatewaySettings(host="127.0.0.1", port=free_port(), models=models, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def gateway(reference_triton: EmbeddedTriton, reference_checkpoint: Path) -> Iterator[RunningGateway]:
    settings = gateway_settings([model_entry(reference_checkpoint, reference_triton.grpc_url)], max_body_bytes=65536)
    with GatewayThread(settings) as running:
        yield running


def raw_post(url: str, path: str, headers: bytes, body: bytes) -> tuple[int, dict[str, str], Any]:
    """A POST written byte for byte (header values no HTTP client library would send as given):
    (status, headers, JSON body)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    head = (
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        ).encode()
        + headers
        + b"\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head + body)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
    parsed = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), parsed, json.loads(payload) if payload else None
