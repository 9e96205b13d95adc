"""The gateway's configuration: one typed object, read once at start-up from a TOML file and the environment.

Environment variables `GATEWAY_<FIELD>` override the file (e.g. `GATEWAY_PORT=9000`). The served models
are the `[[models]]` tables of the file (see `gateway/gateway.example.toml`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from triton_models import tensors as t


class ModelEntry(BaseModel):
    """One public model id and how to reach it in Triton."""

    id: Annotated[str, Field(min_length=1)]
    ensemble: str = t.ENSEMBLE
    generation_model: str = t.CPU_LLM  # where `stop` requests go (tensorrt_llm on GPUs)
    tokenizer_dir: Path  # a checkpoint directory with tokenizer.json: prompt tokens are counted with it
    context_length: Annotated[int, Field(ge=2)]
    default_max_tokens: Annotated[int, Field(ge=1)] = 512  # when the request gives none (capped by the context)
    endpoints: Annotated[list[str], Field(min_length=1)]  # Triton gRPC addresses, host:port
    accepts_images: bool = False


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = 8080
    request_timeout_s: Annotated[float, Field(gt=0)] = 300.0  # the whole request, streaming included
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1 << 20
    stop_request_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    readiness_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    models: list[ModelEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> GatewaySettings:
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique: {duplicates}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_settings, init_settings  # the environment overrides the file

    @classmethod
    def from_file(cls, path: Path, **overrides: Any) -> GatewaySettings:
        with path.open("rb") as handle:
            values = tomllib.load(handle)
        return cls(**{**values, **overrides})
