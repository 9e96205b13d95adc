"""`python -m build_engines build`: checkpoint + target → engine (on GPUs) + model repository + registry entry.

Everything that can be checked is checked before any step runs (target, checkpoint files, architecture,
context length, parallelism, FP8 support). With --dry-run the plan is printed and the repository is
rendered with the engine path the build would use; without it the steps run (inside the NGC container for
GPU targets), each with its own log, and the engine's own config.json is checked against the target.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from build_engines.plan import BuildPlan, plan_build
from build_engines.repository import RepositorySettings, render_repository
from build_engines.targets import Target, TargetCatalog
from cpu_engine import EngineError
from triton_models import tensors as t
from triton_models.serve import MANIFEST_FILE, server_command

REGISTRY_ENTRY_FILE = "gateway-model.toml"


class BuildFailed(EngineError):
    """A build step failed; the message names the command and its log."""


@dataclass(frozen=True)
class BuildResult:
    plan: BuildPlan
    repository: Path
    registry_entry: Path
    manifest: Path


def repository_settings(plan: BuildPlan) -> RepositorySettings:
    target = plan.target
    checkpoint = str(plan.checkpoint.resolve())
    lora = {}
    if plan.lora:
        lora = {
            "lora_max_rank": target.lora_max_rank,
            "lora_target_modules": ",".join(target.lora_target_modules),
            "lora_cache_max_adapters": target.lora_cache_max_adapters,
            "lora_cache_max_adapter_size": target.lora_max_rank,
            "lora_cache_optimal_adapter_size": min(8, target.lora_max_rank),
            "lora_cache_gpu_memory_fraction": target.lora_cache_gpu_memory_fraction,
        }
    if not target.is_gpu:
        return RepositorySettings(
            checkpoint_dir=checkpoint,
            generation_model=target.generation_model,
            engine_max_batch_size=target.max_batch_size,
            max_kv_tokens=target.max_kv_tokens,
            max_num_tokens=target.max_num_tokens,
            **lora,  # type: ignore[arg-type]
        )
    return RepositorySettings(
        **lora,  # type: ignore[arg-type]
        # Image features and adapter weights enter the engine in its own dtype.
        prompt_embedding_table_data_type=_engine_tensor_type(target),
        lora_weights_data_type=_engine_tensor_type(target),
        visual_engine_dir=str(plan.engine_dir / "vision") if plan.model.accepts_images else "",
        checkpoint_dir=checkpoint,
        generation_model=target.generation_model,
        triton_max_batch_size=target.max_batch_size,
        engine_dir=str(plan.engine_dir),
        batch_scheduler_policy=target.batch_scheduler_policy,
        kv_cache_free_gpu_mem_fraction=target.kv_cache_free_gpu_mem_fraction,
        enable_chunked_context=target.enable_chunked_context,
        preprocessing_instance_count=GPU_PREPROCESSING_INSTANCES,
        # Every image enters the prompt as the same placeholder ids (vocab_size + row), so KV-cache reuse would
        # match two different images' blocks as one prefix; TensorRT-LLM 0.14 has no per-request extra ids to
        # tell them apart, so reuse stays off for vision-language models.
        enable_kv_cache_reuse=target.enable_kv_cache_reuse and not plan.model.accepts_images,
    )


# Tokenizing prompts in parallel on a GPU host's CPUs: one Python instance would serialize every request's way
# in ahead of an engine that batches hundreds (images are decoded and encoded by multimodal_encoders, which
# stays one instance). NVIDIA's
# model-configuration guide advises more than one. Postprocessing stays one instance, which keeps each
# stream's pieces in order.
GPU_PREPROCESSING_INSTANCES = 4


def _toml_string(value: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's (a quote in a model id, a backslash in a path)."""
    return json.dumps(value, ensure_ascii=False)


def registry_entry(plan: BuildPlan, model_id: str, endpoint: str) -> str:
    """The gateway's [[models]] table for the built model (append it to the gateway's config file)."""
    context = plan.max_seq_len
    return (
        "[[models]]\n"
        f"id = {_toml_string(model_id)}\n"
        f'ensemble = "{t.ENSEMBLE}"\n'
        f'generation_model = "{plan.target.generation_model}"\n'
        f"tokenizer_dir = {_toml_string(str(plan.checkpoint.resolve()))}\n"
        f"context_length = {context}\n"
        f"default_max_tokens = {min(512, context - 1)}\n"
        f"endpoints = [{_toml_string(endpoint)}]\n"
        f"accepts_images = {'true' if plan.model.accepts_images else 'false'}\n"
    ) + (lora_entry(plan.target) if plan.lora else "")


def _engine_half_dtype(target: Target) -> str:
    """The 16-bit type image features and adapter weights enter the engine in: its own (float16 on CPU)."""
    return "bfloat16" if target.dtype == "bfloat16" else "float16"


def _engine_tensor_type(target: Target) -> str:
    return {"bfloat16": "TYPE_BF16", "float16": "TYPE_FP16"}[_engine_half_dtype(target)]


def lora_entry(target: Target) -> str:
    """What the gateway checks adapters against, the engine's LoRA limits, and the dtype it sends weights in."""
    modules = ", ".join(f'"{m}"' for m in target.lora_target_modules)
    dtype = _engine_half_dtype(target)
    return f'lora = {{ max_rank = {target.lora_max_rank}, target_modules = [{modules}], weights_dtype = "{dtype}" }}\n'


def checkpoint_hash(checkpoint: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(checkpoint.glob("*.json")) + sorted(checkpoint.glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def build(
    catalog: TargetCatalog,
    checkpoint: Path,
    target_name: str,
    out: Path,
    *,
    dry_run: bool,
    model_id: str,
    endpoint: str = "127.0.0.1:8001",
    lora: bool = False,
    calib_dataset: str | None = None,
) -> BuildResult:
    target = catalog.get(target_name)
    out = out.resolve()
    if dry_run:
        _refuse_replacing_a_build(out)
    plan = plan_build(
        checkpoint.resolve(), target, catalog.container, out / "engines" / target.name, out / "work", lora=lora,
        calib_dataset=calib_dataset,
    )  # fmt: skip
    print(plan.describe(), flush=True)
    gpu: dict[str, Any] = {"name": "not built (dry run)" if dry_run else "cpu", "compute_capability": None}
    if target.is_gpu and not dry_run:
        gpu = _check_build_environment(target, catalog)
        logs = out / "build-logs"
        for index, step in enumerate(plan.steps, 1):
            _run_step(index, step.name, step.command, logs / f"{index:02d}-{step.command[0].rsplit('/', 1)[-1]}.log")
        verify_engine(plan)
    repository = render_repository(repository_settings(plan), out)
    entry = out / REGISTRY_ENTRY_FILE
    entry.write_text(registry_entry(plan, model_id, endpoint))
    manifest = out / MANIFEST_FILE
    manifest.write_text(json.dumps(_manifest(plan, gpu, dry_run), indent=2) + "\n")
    return BuildResult(plan=plan, repository=repository, registry_entry=entry, manifest=manifest)


def _refuse_replacing_a_build(out: Path) -> None:
    """A dry run renders a repository without engines: into a built one it would point the server at engines
    that do not exist and drop the generation model that does."""
    manifest = out / MANIFEST_FILE
    if not manifest.is_file():
        return
    try:
        built = json.loads(manifest.read_text()).get("dry_run") is False
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        built = True  # unreadable: assume it matters
    if built:
        raise BuildFailed(f"{out} holds a built repository ({manifest.name}); give a dry run another --out")


def _manifest(plan: BuildPlan, gpu: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    return {
        "checkpoint": str(plan.checkpoint),
        "checkpoint_sha256": checkpoint_hash(plan.checkpoint),
        "target": plan.target.model_dump(),
        "container": plan.container.reference if plan.target.is_gpu else None,
        "tensorrt_llm_version": plan.container.tensorrt_llm_version if plan.target.is_gpu else None,
        "gpu": gpu,
        "engine_dir": str(plan.engine_dir) if plan.target.is_gpu else None,
        "commands": [step.shell() for step in plan.steps],
        "lora": {"max_rank": plan.target.lora_max_rank, "target_modules": plan.target.lora_target_modules}
        if plan.lora
        else None,
        "dry_run": dry_run,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _check_build_environment(target: Target, catalog: TargetCatalog) -> dict[str, Any]:
    """Refuse to build GPU engines outside the serving container, or on a GPU the target cannot use."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        raise BuildFailed(
            f"TensorRT-LLM is not installed here: build inside {catalog.container.reference} "
            "(the image that will serve the engine), or use --dry-run"
        )
    query = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    result = subprocess.run(query, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not result.stdout.strip():
        raise BuildFailed("no GPU is visible (nvidia-smi found none)")
    gpus = [line.split(", ") for line in result.stdout.strip().splitlines()]
    if len(gpus) < target.world_size:
        raise BuildFailed(f"target {target.name} needs {target.world_size} GPUs, {len(gpus)} visible")
    name, capability = gpus[0][0], gpus[0][1]
    if target.uses_fp8 and tuple(int(p) for p in capability.split(".")) < (8, 9):
        raise BuildFailed(f"target {target.name} uses FP8, which {name} (compute capability {capability}) lacks")
    return {"name": name, "compute_capability": capability, "count": len(gpus)}


def _run_step(index: int, name: str, command: list[str], log_path: Path) -> None:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{index}] {name} ... (log: {log_path})", flush=True)
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            time.sleep(10)
            print(f"[{index}] still running after {time.monotonic() - started:.0f} s", flush=True)
    if process.returncode != 0:
        raise BuildFailed(
            f"step {index} failed (exit {process.returncode}): {' '.join(command)}\nlog kept at {log_path}"
        )
    print(f"[{index}] done in {time.monotonic() - started:.0f} s", flush=True)


# The names a checkpoint's architecture may be recorded under besides its own: FP8 checkpoints come from
# ModelOpt's export (quantize.py), which in TensorRT-LLM 0.14's release records its decoder family's name
# (Mistral is exported as a llama, Qwen2 as a qwen); convert_checkpoint.py records the Hugging Face name.
_RECORDED_ARCHITECTURES = {"MistralForCausalLM": ("LlamaForCausalLM",), "Qwen2ForCausalLM": ("QWenForCausalLM",)}


def verify_engine(plan: BuildPlan) -> None:
    """The built engine must be the one the target asked for (its own config.json), one engine per rank."""
    config_path = plan.engine_dir / "config.json"
    if not config_path.is_file():
        raise BuildFailed(f"{plan.engine_dir}: the build wrote no config.json")
    config = json.loads(config_path.read_text())
    pretrained = config.get("pretrained_config", {})
    build_config = config.get("build_config", {})
    mapping = pretrained.get("mapping", {})
    target = plan.target
    # For a vision-language checkpoint the converter records its language model's architecture.
    architecture, recorded = plan.model.language_model_architecture, pretrained.get("architecture")
    if target.quantization == "fp8" and recorded in _RECORDED_ARCHITECTURES.get(architecture, ()):
        recorded = architecture  # the same model under ModelOpt's name for it
    expected = {
        "architecture": (recorded, architecture),
        "dtype": (pretrained.get("dtype"), target.dtype),
        "tp_size": (mapping.get("tp_size"), target.tp_size),
        "pp_size": (mapping.get("pp_size"), target.pp_size),
        "max_batch_size": (build_config.get("max_batch_size"), target.max_batch_size),
        "max_input_len": (build_config.get("max_input_len"), target.max_input_len),
        "max_seq_len": (build_config.get("max_seq_len"), plan.max_seq_len),
    }
    quant = pretrained.get("quantization", {})
    algo = {"fp8": "FP8", "int8_weight_only": "W8A16", "int4_weight_only": "W4A16", "none": None}[target.quantization]
    expected["quantization"] = (quant.get("quant_algo"), algo)
    wrong = {k: v for k, v in expected.items() if v[0] != v[1]}
    if wrong:
        details = ", ".join(f"{k}: engine {v[0]!r}, target {v[1]!r}" for k, v in wrong.items())
        raise BuildFailed(f"the engine does not match target {target.name}: {details}")
    missing = [r for r in range(target.world_size) if not (plan.engine_dir / f"rank{r}.engine").is_file()]
    if missing:
        raise BuildFailed(f"{plan.engine_dir}: no engine for rank(s) {missing}")


def main_build(
    argv_target: str, checkpoint: Path, out: Path, dry_run: bool, model_id: str, targets: Path, endpoint: str,
    lora: bool = False, calib_dataset: str | None = None,
) -> Path:  # fmt: skip
    from build_engines.targets import load_targets

    result = build(
        load_targets(targets), checkpoint, argv_target, out, dry_run=dry_run, model_id=model_id, endpoint=endpoint,
        lora=lora, calib_dataset=calib_dataset,
    )  # fmt: skip
    print(f"repository: {result.repository}\ngateway entry: {result.registry_entry}\nmanifest: {result.manifest}")
    world = result.plan.target.world_size
    print(
        f"serve it with: python3 -m triton_models.serve --repository {result.repository}\n"
        f"  (runs: {' '.join(server_command(result.repository, world))})",
        file=sys.stderr,
    )
    return result.repository
