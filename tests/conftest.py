"""Shared fixtures: checkpoints are made once per test session (the reference one is cached on disk)."""

from __future__ import annotations

from pathlib import Path

import pytest

from build_engines.reference_model import ensure_reference_checkpoint
from build_engines.tiny_checkpoints import TokenizerStyle, write_tiny_checkpoint
from cpu_engine import Engine, EngineLimits


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
