"""Plan an engine build: validate the checkpoint against the target, then the exact commands, in order.

The commands are TensorRT-LLM's classic compiled-engine flow, run inside the NGC container that will
serve the engine: convert (or quantize, for FP8) the Hugging Face checkpoint into a TensorRT-LLM
checkpoint with one shard per rank, then `trtllm-build` it with the target's limits. The plan is data;
`build.py` runs it (or, with --dry-run, prints it).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from build_engines.targets import Container, Target
from cpu_engine import CheckpointError, ModelConfig
from cpu_engine.lora import TRTLLM_MODULES

# Architectures TensorRT-LLM's llama example converts (the CPU engine serves the same set).
GPU_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "LlavaForConditionalGeneration")
# LLaVA's language model converts with the llama example (it reads the LLaVA checkpoint's language part).
_EXAMPLE_DIRS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen",
                 "LlavaForConditionalGeneration": "llama"}  # fmt: skip


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]

    def shell(self) -> str:
        return shlex.join(self.command)


@dataclass(frozen=True)
class BuildPlan:
    target: Target
    container: Container
    checkpoint: Path
    model: ModelConfig
    engine_dir: Path  # where the engine is (or would be) written; the tensorrt_llm config points here
    lora: bool = False  # build (or serve, on cpu) with LoRA: the target's lora_* settings
    steps: list[Step] = field(default_factory=list)

    @property
    def max_seq_len(self) -> int:
        return min(self.target.max_seq_len, self.model.max_position_embeddings)

    def describe(self) -> str:
        t = self.target
        lines = [
            f"target {t.name}: {t.gpu}, {t.dtype}, quantization {t.quantization}, KV cache {t.kv_cache_dtype}, "
            f"tp {t.tp_size} x pp {t.pp_size}",
            f"LoRA: rank <= {t.lora_max_rank}, modules {' '.join(t.lora_target_modules)}, "
            f"cache {t.lora_cache_max_adapters} adapters"
            if self.lora
            else "LoRA: off",
            f"checkpoint {self.checkpoint} ({self.model.architecture}, context {self.model.max_position_embeddings})",
        ]
        if t.is_gpu:
            lines.append(
                f"build and serve in {self.container.reference} (TensorRT-LLM {self.container.tensorrt_llm_version})"
            )
        lines += [f"step {i}: {step.name}\n  {step.shell()}" for i, step in enumerate(self.steps, 1)]
        if not self.steps:
            lines.append("no engine to build: the CPU engine serves the checkpoint directly")
        return "\n".join(lines)


def read_checkpoint(checkpoint: Path) -> ModelConfig:
    """The model facts of a checkpoint directory that has what serving it needs, or a CheckpointError."""
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no such checkpoint directory")
    for required in ("config.json", "tokenizer.json"):
        if not (checkpoint / required).is_file():
            raise CheckpointError(f"{checkpoint}: {required} is missing")
    if not list(checkpoint.glob("*.safetensors")):
        raise CheckpointError(f"{checkpoint}: no *.safetensors weights")
    return ModelConfig.from_checkpoint(checkpoint)


def validate_checkpoint(checkpoint: Path, target: Target) -> ModelConfig:
    """The checkpoint's model facts, or a CheckpointError saying what is wrong (before any step runs)."""
    model = read_checkpoint(checkpoint)
    if target.is_gpu and model.architecture not in GPU_ARCHITECTURES:
        raise CheckpointError(f"architecture {model.architecture} has no TensorRT-LLM conversion here")
    if target.is_gpu and model.accepts_images and target.dtype != "float16":
        raise CheckpointError(
            f"vision-language checkpoints are served here with a float16 prompt table (the Python models cannot "
            f"produce {target.dtype}); use a float16 target (e.g. a10g, or one of your own in targets.toml)"
        )
    if model.max_position_embeddings < target.max_seq_len:
        raise CheckpointError(
            f"the checkpoint's context length ({model.max_position_embeddings}) is shorter than target "
            f"{target.name}'s max_seq_len ({target.max_seq_len}); lower max_seq_len in a target of your own"
        )
    for name, count in (("attention heads", model.num_heads), ("key/value heads", model.num_kv_heads)):
        if count % target.tp_size:
            raise CheckpointError(f"tensor parallelism {target.tp_size} does not divide the model's {count} {name}")
    if model.num_layers % target.pp_size:
        raise CheckpointError(f"pipeline parallelism {target.pp_size} does not divide {model.num_layers} layers")
    return model


def plan_build(
    checkpoint: Path, target: Target, container: Container, engine_dir: Path, work_dir: Path, lora: bool = False,
    calib_dataset: str | None = None,
) -> BuildPlan:  # fmt: skip
    model = validate_checkpoint(checkpoint, target)
    plan = BuildPlan(
        target=target, container=container, checkpoint=checkpoint, model=model, engine_dir=engine_dir, lora=lora
    )
    if not target.is_gpu:
        return plan
    trtllm_checkpoint = work_dir / "trtllm_checkpoint"
    parallel = ["--tp_size", str(target.tp_size), "--pp_size", str(target.pp_size)]
    examples = Path(container.examples_dir)
    if target.quantization == "fp8":
        # quantize.py downloads its calibration set unless given one: a cluster without internet access passes
        # a local copy (--calib-dataset).
        calibration = ["--calib_dataset", calib_dataset] if calib_dataset else []
        convert = Step(
            "quantize to FP8 (weights and KV cache), calibrated on "
            + (calib_dataset or "quantize.py's default set (downloaded)"),
            ["python3", str(examples / "quantization" / "quantize.py"), "--model_dir", str(checkpoint),
             "--output_dir", str(trtllm_checkpoint), "--dtype", target.dtype, "--qformat", "fp8",
             "--kv_cache_dtype", "fp8", "--calib_size", "512", *calibration, *parallel],
        )  # fmt: skip
    else:
        command = [
            "python3", str(examples / _EXAMPLE_DIRS[model.architecture] / "convert_checkpoint.py"),
            "--model_dir", str(checkpoint), "--output_dir", str(trtllm_checkpoint), "--dtype", target.dtype, *parallel,
        ]  # fmt: skip
        if target.quantization in ("int8_weight_only", "int4_weight_only"):
            command += ["--use_weight_only", "--weight_only_precision", target.quantization.split("_")[0]]
        convert = Step(f"convert the checkpoint ({target.quantization} quantization)", command)
    build = [
        "trtllm-build", "--checkpoint_dir", str(trtllm_checkpoint), "--output_dir", str(engine_dir),
        "--max_batch_size", str(target.max_batch_size), "--max_input_len", str(target.max_input_len),
        "--max_seq_len", str(plan.max_seq_len), "--max_num_tokens", str(target.max_num_tokens),
        # FP8 GEMMs run without the GEMM plugin; everything else lets TensorRT-LLM pick it.
        "--gemm_plugin", "disable" if target.quantization == "fp8" else "auto",
        "--kv_cache_type", "paged", "--use_paged_context_fmha", "enable", "--multiple_profiles", "enable",
        "--workers", str(target.world_size),
    ]  # fmt: skip
    if lora:
        # The LoRA plugin in the model's dtype; adapters then arrive with requests (lora_weights, lora_config).
        build += ["--lora_plugin", "auto", "--max_lora_rank", str(target.lora_max_rank), "--lora_target_modules",
                  *(TRTLLM_MODULES[m][0] for m in target.lora_target_modules)]  # fmt: skip
    steps = [convert]
    if model.accepts_images:
        from cpu_engine.vision import VisionConfig

        # The LLM takes image features as a prompt table: room for every sequence's images at once.
        rows = (
            target.max_batch_size
            * target.max_images_per_request
            * VisionConfig.from_checkpoint(checkpoint).tokens_per_image
        )
        build += ["--max_prompt_embedding_table_size", str(rows)]
        visual = [
            "python3", str(examples / "multimodal" / "build_visual_engine.py"), "--model_type", "llava",
            "--model_path", str(checkpoint), "--output_dir", str(engine_dir / "vision"),
            "--max_batch_size", str(target.max_batch_size * target.max_images_per_request),
        ]  # fmt: skip
        steps.append(Step("build the vision engine (vision tower + projector) for multimodal_encoders", visual))
    steps.insert(1, Step(f"build one engine per rank ({target.world_size})", build))
    plan.steps.extend(steps)
    return plan
