"""`make serve`: the embedded default — reference model, CPU repository, Triton from the wheel, gateway.

Everything is prepared once under `.cache/` (the converted checkpoint, the rendered repository) and reused.
"""

from __future__ import annotations

from pathlib import Path

from build_engines.reference_model import REFERENCE_MODEL_ID, cache_root, ensure_reference_checkpoint
from build_engines.repository import RepositorySettings, render_repository
from cpu_engine import ModelConfig
from cpu_engine.lora import MODULES
from gateway.settings import GatewaySettings, LoraSettings, ModelEntry
from triton_models import tensors as t
from triton_models.launcher import EmbeddedTriton

# The embedded CPU engine serves LoRA adapters on the reference model: any of the Llama modules, up to this rank.
EMBEDDED_LORA_MAX_RANK = 64
EMBEDDED_LORA_CACHE_ADAPTERS = 8


def embedded_repository_settings(checkpoint: Path) -> RepositorySettings:
    return RepositorySettings(
        checkpoint_dir=str(checkpoint),
        lora_max_rank=EMBEDDED_LORA_MAX_RANK,
        lora_target_modules=",".join(MODULES),
        lora_cache_max_adapters=EMBEDDED_LORA_CACHE_ADAPTERS,
    )


def prepare_embedded_triton(log_path: Path | None = None) -> tuple[EmbeddedTriton, Path]:
    """(a not yet started server on the reference model's CPU repository, the checkpoint directory)."""
    checkpoint = ensure_reference_checkpoint()
    repository = render_repository(
        embedded_repository_settings(checkpoint), cache_root() / "repositories" / REFERENCE_MODEL_ID
    )
    return EmbeddedTriton(repository, log_path=log_path or cache_root() / "logs" / "triton.log"), checkpoint


def embedded_model_entry(checkpoint: Path, endpoint: str) -> ModelEntry:
    config = ModelConfig.from_checkpoint(checkpoint)
    return ModelEntry(
        id=REFERENCE_MODEL_ID,
        ensemble=t.ENSEMBLE,
        generation_model=t.CPU_LLM,
        tokenizer_dir=checkpoint,
        context_length=config.max_position_embeddings,
        endpoints=[endpoint],
        lora=LoraSettings(max_rank=EMBEDDED_LORA_MAX_RANK, target_modules=list(MODULES)),
    )


def embedded_settings(checkpoint: Path, endpoint: str, host: str = "127.0.0.1", port: int = 8080) -> GatewaySettings:
    # Open mode (no keys), usage ledger and adapter store next to the other cached files, logs for a terminal.
    return GatewaySettings(
        host=host,
        port=port,
        models=[embedded_model_entry(checkpoint, endpoint)],
        data_dir=cache_root() / "gateway",
        log_format="text",
    )
