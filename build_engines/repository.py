"""Render a ready Triton model repository from the templates in `model_repository/`.

One code path for every target: the CPU target names `cpu_llm` as the generation model, GPU targets name
`tensorrt_llm` with an engine directory. Each rendered `config.pbtxt` must have every `${...}` variable
filled and must parse with Triton's own protobuf schema, or rendering fails before anything is written
where Triton would read it.
"""

from __future__ import annotations

import re
import shutil
import string
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from cpu_engine import ModelConfig
from cpu_engine.errors import CheckpointError
from model_repository import TEMPLATE_DIR
from triton_models import tensors as t

_UNFILLED = re.compile(r"\$\{[^}]*\}")


class RenderError(ValueError):
    """A template could not be rendered into a valid Triton config."""


@dataclass(frozen=True)
class RepositorySettings:
    """Every template variable. Defaults are the CPU target's; GPU targets override the tensorrt_llm ones."""

    checkpoint_dir: str
    generation_model: str = t.CPU_LLM
    triton_max_batch_size: int = 64
    preprocessing_instance_count: int = 1
    # Postprocessing is stateless, but Triton's ensemble forwards each response as soon as its
    # postprocessing finishes: with two instances, streamed pieces were seen arriving out of order.
    postprocessing_instance_count: int = 1
    # cpu_llm: the engine's limits (cpu_engine.EngineLimits)
    engine_max_batch_size: int = 16
    max_kv_tokens: int = 65536
    max_num_tokens: int = 512
    max_queue_size: int = 256
    exclude_input_in_output: bool = True
    # LoRA (cpu_llm; the rank and modules also go into a GPU engine's build): 0 = off. Modules by their
    # Hugging Face names (cpu_engine.lora.MODULES), comma-separated; empty = all.
    lora_max_rank: int = 0
    lora_target_modules: str = ""
    lora_cache_max_adapters: int = 8
    # Vision-language checkpoints (set by render_repository from the checkpoint): a multimodal_encoders
    # model, and the ensemble passes images through preprocessing to the generation model's prompt table.
    multimodal: bool = False
    visual_engine_dir: str = ""  # GPU builds: the TensorRT vision engine multimodal_encoders runs
    # image features enter the prompt as a table of this type: float32 on CPU, the engine's dtype on GPUs
    prompt_embedding_table_data_type: str = "TYPE_FP32"
    # LoRA adapter weights as requests carry them: TensorRT-LLM takes them only in the engine's dtype.
    lora_weights_data_type: str = "TYPE_FP16"
    # tensorrt_llm
    engine_dir: str = ""
    decoupled_mode: bool = True
    max_queue_delay_microseconds: int = 0
    batch_scheduler_policy: str = "guaranteed_no_evict"
    kv_cache_free_gpu_mem_fraction: float = 0.9
    max_tokens_in_paged_kv_cache: int = 0
    enable_chunked_context: bool = True
    enable_kv_cache_reuse: bool = False
    cancellation_check_period_ms: int = 100
    lora_cache_optimal_adapter_size: int = 8
    lora_cache_max_adapter_size: int = 64
    lora_cache_gpu_memory_fraction: float = 0.05
    lora_cache_host_memory_bytes: int = 1 << 30

    def variables(self) -> dict[str, str]:
        values = {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in asdict(self).items()}
        values["tokenizer_dir"] = self.checkpoint_dir
        if self.max_tokens_in_paged_kv_cache == 0:
            values["max_tokens_in_paged_kv_cache"] = ""  # empty: let TensorRT-LLM size it from the memory fraction
        values.update(_MULTIMODAL_SNIPPETS if self.multimodal else dict.fromkeys(_MULTIMODAL_SNIPPETS, ""))
        values["multimodal_encoders_model"] = t.MULTIMODAL_ENCODERS if self.multimodal else ""
        return values

    def models(self) -> list[str]:
        encoders = [t.MULTIMODAL_ENCODERS] if self.multimodal else []
        return [t.PREPROCESSING, *encoders, self.generation_model, t.POSTPROCESSING, t.ENSEMBLE]


# The ensemble's image path, present only for vision-language checkpoints: a text-only engine must never be
# handed a prompt table (TensorRT-LLM refuses one an engine was not built for).
_MULTIMODAL_SNIPPETS = {
    "ensemble_image_input": (
        f'input {{ name: "{t.IMAGE_BYTES_INPUT}", data_type: TYPE_STRING, dims: [ -1 ], optional: true }}'
    ),
    "preprocessing_image_map": (
        f'input_map {{ key: "{t.PRE_IMAGE_BYTES}" value: "{t.IMAGE_BYTES_INPUT}" }} '
        f'output_map {{ key: "{t.PRE_PROMPT_EMBEDDING_TABLE}" value: "_PROMPT_EMBEDDING_TABLE" }} '
        f'output_map {{ key: "{t.PRE_PROMPT_VOCAB_SIZE}" value: "_PROMPT_VOCAB_SIZE" }}'
    ),
    "generation_image_map": (
        f'input_map {{ key: "{t.PROMPT_EMBEDDING_TABLE}" value: "_PROMPT_EMBEDDING_TABLE" }} '
        f'input_map {{ key: "{t.PROMPT_VOCAB_SIZE}" value: "_PROMPT_VOCAB_SIZE" }}'
    ),
}


def render_config(template: str, variables: dict[str, str], origin: str) -> str:
    """The filled-in config text, checked against Triton's schema (comments are kept for operators)."""
    try:
        text = string.Template(template).substitute(variables)
    except KeyError as missing:
        raise RenderError(f"{origin}: no value for template variable {missing}") from missing
    leftover = _UNFILLED.findall(text)
    if leftover:
        raise RenderError(f"{origin}: unfilled template variables {sorted(set(leftover))}")
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise RenderError(f"{origin}: not a valid Triton model config: {error}") from error
    return text


def render_repository(settings: RepositorySettings, out_dir: Path, templates: Path = TEMPLATE_DIR) -> Path:
    """Write the repository for these settings into out_dir (replacing what a previous render left there)."""
    checkpoint = Path(settings.checkpoint_dir)
    if not (checkpoint / "tokenizer.json").is_file():
        raise CheckpointError(f"{checkpoint}: no tokenizer.json (is it a checkpoint directory?)")
    if settings.generation_model == t.TENSORRT_LLM and not settings.engine_dir:
        raise RenderError("the tensorrt_llm generation model needs an engine directory")
    if (checkpoint / "config.json").is_file() and ModelConfig.from_checkpoint(checkpoint).accepts_images:
        settings = replace(settings, multimodal=True)
    variables = settings.variables()
    rendered = {}
    for model in settings.models():
        source = templates / model / "config.pbtxt"
        rendered[model] = render_config(source.read_text(), variables, str(source.relative_to(templates)))
    # Replace only the model folders rendered here: engines, manifests and other files under out_dir stay.
    out_dir.mkdir(parents=True, exist_ok=True)
    for model in settings.models():
        staging = out_dir / f".{model}.rendering"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(templates / model, staging, ignore=shutil.ignore_patterns("__pycache__", ".keep"))
        (staging / "config.pbtxt").write_text(rendered[model])
        (staging / "1").mkdir(exist_ok=True)
        shutil.rmtree(out_dir / model, ignore_errors=True)
        staging.rename(out_dir / model)
    for stale in (t.CPU_LLM, t.TENSORRT_LLM, t.ECHO_LLM, t.MULTIMODAL_ENCODERS):
        if stale not in settings.models():
            shutil.rmtree(out_dir / stale, ignore_errors=True)  # a previous render for another generation model
    return out_dir
