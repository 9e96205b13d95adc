"""`make serve`: the embedded default — reference model, CPU repository, Triton from the wheel, gateway.

Everything is prepared once under `.cache/` (the converted checkpoint, the rendered repository) and reused.
"""

from __future__ import annotations

from pathlib import Path

from build_engines.reference_model import REFERENCE_MODEL_ID, cache_root, ensure_reference_checkpoint
from build_engines.repository import RepositorySettings, render_repository
from cpu_engine import ModelConfig
from gateway.settings import GatewaySettings, ModelEntry
from triton_models import tensors as t
from triton_models.launcher import EmbeddedTriton


def prepare_embedded_triton(log_path: Path | None = None) -> tuple[EmbeddedTriton, Path]:
    """(a not yet started server on the reference model's CPU repository, the checkpoint directory)."""
    checkpoint = ensure_reference_checkpoint()
    repository = render_repository(
        RepositorySettings(checkpoint_dir=str(checkpoint)), cache_root() / "repositories" / REFERENCE_MODEL_ID
    )
    return EmbeddedTriton(repository, log_path=log_path or cache_root() / "logs" / "triton.log"), checkpoint


def embedded_settings(server: EmbeddedTriton, checkpoint: Path, host: str, port: int) -> GatewaySettings:
    config = ModelConfig.from_checkpoint(checkpoint)
    model = ModelEntry(
        id=REFERENCE_MODEL_ID,
        ensemble=t.ENSEMBLE,
        generation_model=t.CPU_LLM,
        tokenizer_dir=checkpoint,
        context_length=config.max_position_embeddings,
        endpoints=[server.grpc_url],
    )
    # Open mode (no keys), usage ledger in SQLite next to the other cached files, logs for a terminal.
    return GatewaySettings(host=host, port=port, models=[model], data_dir=cache_root() / "gateway", log_format="text")
