"""Shared fixtures: checkpoints are made once per test session (the reference one is cached on disk)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from build_engines.reference_model import ensure_reference_checkpoint
from build_engines.repository import RepositorySettings, render_repository
from build_engines.tiny_checkpoints import TokenizerStyle, write_tiny_checkpoint
from cpu_engine import Engine, EngineLimits
from triton_models.launcher import EmbeddedTriton


def pytest_addoption(parser: pytest.Parser) -> None:
    # Here, not in tests/reliability/conftest.py: pytest reads options only from the first conftest files.
    parser.addoption("--soak-seconds", type=float, default=60.0, help="length of the soak test (make test: 60)")
    parser.addoption("--fuzz-cases", type=int, default=2000, help="schemathesis cases against /openapi.json")


@pytest.fixture(scope="session")
def reference_checkpoint() -> Path:
    return ensure_reference_checkpoint()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[TokenizerStyle, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {style: write_tiny_checkpoint(root / style.value, style) for style in TokenizerStyle}


@pytest.fixture(scope="session")
def reference_engine(reference_checkpoint: Path) -> Engine:
    return Engine.from_checkpoint(reference_checkpoint, EngineLimits(max_batch_size=16, max_kv_tokens=16384))


@pytest.fixture(scope="session", params=list(TokenizerStyle), ids=lambda s: s.value)
def tiny_style(request: pytest.FixtureRequest) -> TokenizerStyle:
    return request.param  # type: ignore[no-any-return]


# The session's servers serve LoRA adapters too, as the embedded default does.
SESSION_LORA_MAX_RANK = 64


def _serve(checkpoint: Path, workdir: Path) -> EmbeddedTriton:
    settings = RepositorySettings(checkpoint_dir=str(checkpoint), lora_max_rank=SESSION_LORA_MAX_RANK)
    repository = render_repository(settings, workdir / "repository")
    return EmbeddedTriton(repository, log_path=workdir / "triton.log").start()


@pytest.fixture(scope="session")
def reference_triton(reference_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    """A real Triton server on the rendered CPU repository of the reference model, once per test run."""
    server = _serve(reference_checkpoint, tmp_path_factory.mktemp("triton-reference"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_tritons(
    tiny_checkpoints: dict[TokenizerStyle, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[TokenizerStyle, EmbeddedTriton]]:
    servers = {s: _serve(c, tmp_path_factory.mktemp(f"triton-{s.value}")) for s, c in tiny_checkpoints.items()}
    yield servers
    for server in servers.values():
        server.stop()
