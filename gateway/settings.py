"""The gateway's configuration: one typed object, read once at start-up from a TOML file and the environment.

Environment variables `GATEWAY_<FIELD>` override the file (e.g. `GATEWAY_PORT=9000`). The served models
are the `[[models]]` tables of the file (see `gateway/gateway.example.toml`).
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from build_engines.adapter_store import LoraSupport
from cpu_engine.lora import MODULES
from gateway.event_loop import DEFAULT_EVENT_LOOP, EventLoopName
from triton_models import tensors as t

ALL_ACCOUNTS = "*"


class ConfigError(ValueError):
    """The gateway cannot start with this configuration; the message names the file and the setting."""


class ApiKey(BaseModel):
    """One API key, stored as its SHA-256 digest (`python -m gateway hash-key`), never in clear."""

    id: Annotated[str, Field(min_length=1, max_length=64)]  # what the ledger and logs record
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    accounts: Annotated[list[str], Field(min_length=1)] = [ALL_ACCOUNTS]  # accounts it may use; "*": all


class LoraSettings(BaseModel):
    """The base model's engine serves LoRA adapters up to this rank, for these modules (Hugging Face names);
    `python -m build_engines build --lora` writes this table into the model's gateway entry."""

    max_rank: Annotated[int, Field(ge=1)]
    target_modules: list[Literal[MODULES]] = list(MODULES)  # type: ignore[valid-type]
    # The engine's dtype: TensorRT-LLM refuses adapter weights in any other ("bfloat16" engines need bfloat16).
    weights_dtype: Literal["float16", "bfloat16"] = "float16"


class ModelEntry(BaseModel):
    """One public model id and how to reach it in Triton."""

    id: Annotated[str, Field(min_length=1)]
    ensemble: str = t.ENSEMBLE
    generation_model: str = t.CPU_LLM  # where `stop` requests go (tensorrt_llm on GPUs)
    tokenizer_dir: Path  # a checkpoint directory with tokenizer.json: prompt tokens are counted with it
    context_length: Annotated[int, Field(ge=2)]
    default_max_tokens: Annotated[int, Field(ge=1)] = 512  # when the request gives none (capped by the context)
    # Triton gRPC addresses (host:port), one per replica. With discovery = "dns" each is a name that is
    # re-resolved every dns_refresh_s, one replica per address it resolves to (a Kubernetes headless service).
    endpoints: Annotated[list[str], Field(min_length=1)]
    discovery: Literal["static", "dns"] = "static"
    accepts_images: bool = False
    # Requests running at once for this model (None: no gateway limit; Triton queues); more wait in a queue.
    max_concurrent: Annotated[int | None, Field(ge=1)] = None
    # Custom models (LoRA adapters) may be registered on this model when set.
    lora: LoraSettings | None = None

    @property
    def lora_support(self) -> LoraSupport | None:
        """What the adapter store checks adapters against (None: no custom models on this model)."""
        lora = self.lora
        return None if lora is None else LoraSupport(lora.max_rank, tuple(lora.target_modules))

    @field_validator("endpoints")
    @classmethod
    def _host_and_port(cls, endpoints: list[str]) -> list[str]:
        for endpoint in endpoints:
            host, _, port = endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"endpoint {endpoint!r} is not host:port")
        return endpoints


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = 8080
    request_timeout_s: Annotated[float, Field(gt=0)] = 300.0  # the whole request, streaming included; also the
    # cap on what a client may ask for with the x-request-timeout header
    body_read_timeout_s: Annotated[float, Field(gt=0)] = 30.0  # the request body, within request_timeout_s
    # A streaming client that takes nothing for this long, with its buffers full, is cut off and its generation
    # stopped; what is buffered for one stream is bounded by stream_send_buffer_bytes (the socket's send
    # buffer) plus aiohttp's 64 KiB.
    slow_client_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    stream_send_buffer_bytes: Annotated[int, Field(ge=4096)] = 262_144
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1 << 20
    stop_request_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    readiness_timeout_s: Annotated[float, Field(gt=0)] = 2.0  # per Triton health check
    drain_timeout_s: Annotated[float, Field(ge=0)] = 30.0  # on SIGTERM: how long in-flight requests may finish
    health_check_interval_s: Annotated[float, Field(gt=0)] = 2.0  # how often every replica is checked
    # A replica failing its checks whose open streams got nothing for this long: they are cut (retried elsewhere
    # before their first text) instead of waiting for gRPC to notice the dead connection.
    replica_stall_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    # An idle replica gets a one-token request through the ensemble this often (a crashed model process is
    # invisible to Triton's readiness API).
    replica_probe_interval_s: Annotated[float, Field(gt=0)] = 30.0
    dns_refresh_s: Annotated[float, Field(gt=0)] = 10.0  # for models with discovery = "dns"
    models: list[ModelEntry] = Field(default_factory=list)

    # Accounts and keys: no keys = open mode (local development). require_account: requests without an
    # account get 400 (the API's "gradually enforced" account_id, enforced).
    api_keys: list[ApiKey] = Field(default_factory=list)
    require_account: bool = False

    # Limits: requests over max_concurrent (per model) or max_concurrent_per_account wait, fairly between
    # accounts, in a queue of at most max_queued per model; a full queue, or a deadline reached while
    # waiting, is 429 with Retry-After.
    max_concurrent_per_account: Annotated[int | None, Field(ge=1)] = None
    max_queued: Annotated[int, Field(ge=0)] = 256
    retry_after_s: Annotated[int, Field(ge=1)] = 1

    # Usage ledger: one row per request. SQLite (WAL) under data_dir unless ledger_dsn names PostgreSQL.
    ledger_enabled: bool = True
    data_dir: Path = Path(".cache/gateway")
    ledger_dsn: str | None = None  # postgresql://user:password@host/db
    ledger_batch_size: Annotated[int, Field(ge=1)] = 256
    ledger_flush_interval_s: Annotated[float, Field(gt=0)] = 0.5
    ledger_queue_size: Annotated[int, Field(ge=1)] = 100_000
    ledger_retry_s: Annotated[float, Field(gt=0)] = 1.0
    # Rows the database could not take by shutdown, for the next start (default data_dir). Several gateways may
    # share it (any of them stores a file's rows; stored rows are never stored twice).
    ledger_spill_dir: Path | None = None

    log_format: Literal["json", "text"] = "json"
    event_loop: EventLoopName = DEFAULT_EVENT_LOOP

    # Custom models: LoRA adapters registered by id (the admin API or `python -m build_engines adapter`), kept in
    # adapter_store_dir (default data_dir/adapters; shared by every gateway of a deployment). The admin API
    # (/v4/admin/...) needs the key whose sha256 is admin_key_sha256; without one it is off.
    adapter_store_dir: Path | None = None
    admin_key_sha256: Annotated[str | None, Field(pattern=r"^[0-9a-f]{64}$")] = None
    max_adapter_bytes: Annotated[int, Field(ge=1024)] = 1 << 30  # one adapter upload

    # Images (models with accepts_images): data: URLs, and http(s) URLs fetched under a strict policy:
    # loopback/private/link-local addresses refused unless in image_fetch_allowed_networks (CIDRs).
    max_images_per_request: Annotated[int, Field(ge=1)] = 8
    max_image_bytes: Annotated[int, Field(ge=1024)] = 20 << 20
    max_image_pixels: Annotated[int, Field(ge=1)] = 40_000_000  # before decoding: decompression bombs
    image_fetch_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    image_fetch_max_redirects: Annotated[int, Field(ge=0)] = 3
    image_fetch_allowed_networks: list[str] = Field(default_factory=list)

    @field_validator("image_fetch_allowed_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            ipaddress.ip_network(network, strict=False)  # ValueError names the bad one
        return networks

    @property
    def adapter_store(self) -> Path:
        return self.adapter_store_dir or self.data_dir / "adapters"

    @property
    def ledger_spill(self) -> Path:
        return self.ledger_spill_dir or self.data_dir

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
        """The settings of a config file (environment variables win); ConfigError says what is wrong, where."""
        try:
            with path.open("rb") as handle:
                values = tomllib.load(handle)
        except OSError as error:
            raise ConfigError(f"cannot read the config file {path}: {error.strerror or error}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}") from None
        try:
            return cls(**{**values, **overrides})
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in e['loc']) or 'settings'}: {e['msg']}" for e in error.errors()
            )
            raise ConfigError(f"{path}: {problems}") from None
