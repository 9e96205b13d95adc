"""Deployment targets, read from `targets.toml` (data; a new target needs no code change)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cpu_engine.lora import MODULES
from triton_models import tensors as t

TARGETS_FILE = Path(__file__).with_name("targets.toml")
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)  # Ada and Hopper


class TargetError(ValueError):
    """A target is unknown or inconsistent."""


class Container(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str
    version: str
    tensorrt_llm_version: str
    examples_dir: str

    @property
    def reference(self) -> str:
        return f"{self.image}:{self.version}-trtllm-python-py3"


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = ""
    gpu: str
    compute_capability: str  # GPU targets: "major.minor", as nvidia-smi reports it
    generation_model: Literal["tensorrt_llm", "cpu_llm"]
    dtype: Literal["float16", "bfloat16", "float32"]
    quantization: Literal["none", "fp8", "int8_weight_only", "int4_weight_only"]
    kv_cache_dtype: Literal["auto", "fp8"]
    tp_size: Annotated[int, Field(ge=1)]
    pp_size: Annotated[int, Field(ge=1)]
    max_batch_size: Annotated[int, Field(ge=1)]
    max_input_len: Annotated[int, Field(ge=1)]
    max_seq_len: Annotated[int, Field(ge=2)]
    max_num_tokens: Annotated[int, Field(ge=1)]
    max_kv_tokens: Annotated[int, Field(ge=1)] = 65536
    kv_cache_free_gpu_mem_fraction: Annotated[float, Field(ge=0.0, le=1.0)]
    enable_chunked_context: bool
    enable_kv_cache_reuse: bool
    batch_scheduler_policy: Literal["guaranteed_no_evict", "max_utilization"]
    max_images_per_request: Annotated[int, Field(ge=1)] = 4  # vision-language checkpoints: the prompt table's room
    # LoRA, when a build asks for it (--lora): the largest adapter rank, the modules (Hugging Face names),
    # and how many adapters the server's LoRA cache holds (the CPU engine counts adapters; TensorRT-LLM
    # sizes its cache from lora_cache_gpu_memory_fraction).
    lora_max_rank: Annotated[int, Field(ge=1)] = 64
    lora_target_modules: list[Literal[MODULES]] = list(MODULES)  # type: ignore[valid-type]
    lora_cache_max_adapters: Annotated[int, Field(ge=1)] = 8
    lora_cache_gpu_memory_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.05

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def is_gpu(self) -> bool:
        return self.generation_model == t.TENSORRT_LLM

    @property
    def uses_fp8(self) -> bool:
        return self.quantization == "fp8" or self.kv_cache_dtype == "fp8"

    @model_validator(mode="after")
    def _consistent(self) -> Target:
        if self.max_input_len > self.max_seq_len:
            raise ValueError(f"max_input_len ({self.max_input_len}) exceeds max_seq_len ({self.max_seq_len})")
        if self.is_gpu and not re.fullmatch(r"\d+\.\d+", self.compute_capability):
            raise ValueError(f'compute_capability {self.compute_capability!r} is not major.minor (e.g. "9.0")')
        if self.is_gpu and self.uses_fp8:
            major, minor = (int(p) for p in self.compute_capability.split("."))
            if (major, minor) < FP8_MIN_COMPUTE_CAPABILITY:
                raise ValueError(
                    f"FP8 needs compute capability 8.9 or newer (Ada, Hopper); {self.gpu} is {self.compute_capability}"
                )
        if self.is_gpu and self.dtype == "float32":
            # Image features and LoRA weights enter a GPU engine in its 16-bit type (the Python models and the
            # gateway produce float16 or bfloat16), and a float32 engine serves at a fraction of the speed.
            raise ValueError("GPU targets build float16 or bfloat16 engines, not float32")
        if self.is_gpu and self.kv_cache_free_gpu_mem_fraction == 0.0:
            raise ValueError("kv_cache_free_gpu_mem_fraction 0 leaves TensorRT-LLM no memory for the KV cache")
        if not self.is_gpu and (self.world_size != 1 or self.quantization != "none"):
            raise ValueError("the cpu target runs one unquantized engine (tp_size = pp_size = 1, quantization none)")
        return self


class TargetCatalog(BaseModel):
    container: Container
    targets: dict[str, Target]

    def get(self, name: str) -> Target:
        if name not in self.targets:
            raise TargetError(f"unknown target {name!r}; known: {', '.join(sorted(self.targets))}")
        return self.targets[name]


def load_targets(path: Path = TARGETS_FILE) -> TargetCatalog:
    raw = tomllib.loads(path.read_text())
    try:
        catalog = TargetCatalog.model_validate(raw)
    except ValueError as error:
        raise TargetError(f"{path}: {error}") from error
    for name, target in catalog.targets.items():
        target.name = name
    return catalog
