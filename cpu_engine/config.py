"""The model facts the engine needs, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cpu_engine.errors import CheckpointError

# Architectures whose decoder is the Llama block (RMSNorm, RoPE, GQA, SwiGLU).
# Qwen2 differs only by the q/k/v bias; Mistral only by its name (no sliding window here).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Vision-language checkpoints whose language model is one of the above (its config under text_config); the
# vision side is cpu_engine/vision.py.
VISION_LANGUAGE_ARCHITECTURES = ("LlavaForConditionalGeneration",)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = field(default=())
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    # A vision-language checkpoint's language model architecture (its text_config); "" for a text model.
    text_architecture: str = ""

    @property
    def language_model_architecture(self) -> str:
        """The decoder's own architecture: what TensorRT-LLM's converter records for a vision-language model."""
        return self.text_architecture or self.architecture

    @property
    def kv_bytes_per_token(self) -> int:
        """float32 keys and values over all layers: what one cached token costs."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4

    @property
    def accepts_images(self) -> bool:
        return self.architecture in VISION_LANGUAGE_ARCHITECTURES

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        architectures = raw.get("architectures") or ["LlamaForCausalLM"]
        if architectures[0] in VISION_LANGUAGE_ARCHITECTURES:
            # The language model's own config; the checkpoint's identity stays the vision-language one.
            text = {"tie_word_embeddings": raw.get("tie_word_embeddings", False), **raw["text_config"]}
            text["architectures"] = text.get("architectures") or ["LlamaForCausalLM"]
            language = cls.from_dict(text, generation)
            return replace(language, architecture=architectures[0], text_architecture=language.architecture)
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"architecture {architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        sliding = raw.get("sliding_window")
        if sliding and raw.get("use_sliding_window", True) and sliding < raw.get("max_position_embeddings", 0):
            raise CheckpointError("sliding-window attention is not supported by the CPU engine")
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        eos = _id_list((generation or {}).get("eos_token_id", raw.get("eos_token_id")))
        rope_theta, rope_scaling = _rope_settings(raw)
        return cls(
            architecture=architecture,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_ids=tuple(eos),
            bos_token_id=raw.get("bos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path) -> ModelConfig:
        config_path = checkpoint_dir / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{checkpoint_dir}: no config.json")
        generation_path = checkpoint_dir / "generation_config.json"
        generation = _read_json(generation_path) if generation_path.is_file() else None
        try:
            return cls.from_dict(_read_json(config_path), generation)
        except KeyError as missing:
            raise CheckpointError(f"{config_path}: no {missing} (a key every model of this kind has)") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise CheckpointError(f"{config_path}: a value has the wrong type ({error})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return value


def _id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _rope_settings(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either the classic keys or transformers 5's `rope_parameters`."""
    parameters = raw.get("rope_parameters")
    if isinstance(parameters, dict):
        theta = float(parameters.get("rope_theta", raw.get("rope_theta", 10000.0)))
        kind = parameters.get("rope_type", parameters.get("type", "default"))
        return theta, None if kind == "default" else dict(parameters)
    return float(raw.get("rope_theta", 10000.0)), raw.get("rope_scaling")
