"""The vision side of a LLaVA-1.5-style model in numpy: a CLIP vision tower and the multi-modal projector.

Pixel values [n, 3, H, W] become image features [n, tokens_per_image, text hidden size], the rows that replace
the `<image>` placeholder tokens in the language model's input embeddings. It follows transformers'
`LlavaModel.get_image_features`: patch embedding, class and position embeddings, the pre-layernorm, the encoder
layers up to the selected hidden state (later layers never run, and are not even loaded), the CLS row dropped
under the "default" strategy, then linear → activation → linear.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cpu_engine.errors import CheckpointError
from cpu_engine.safetensors_reader import iter_safetensors

Array = npt.NDArray[np.float32]

# What transformers fills in for keys a config.json leaves out: CLIPVisionConfig's own defaults for a partial
# vision_config, LlavaConfig's (a CLIP ViT-L/14 at 336 pixels) when vision_config is missing, and Llama's
# hidden size when text_config has none (published llava-1.5 configs rely on all three).
_CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}  # fmt: skip
_LLAVA_VISION_DEFAULTS: dict[str, Any] = {
    **_CLIP_VISION_DEFAULTS, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
    "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
}  # fmt: skip
_LLAMA_HIDDEN_SIZE_DEFAULT = 4096
SELECT_STRATEGIES = ("default", "full")


def _quick_gelu(x: Array) -> Array:
    # sigmoid through tanh: no overflow in exp for large negative inputs.
    sigmoid: Array = 0.5 + 0.5 * np.tanh(np.float32(0.851) * x)
    return x * sigmoid


def _erf(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    # Abramowitz & Stegun 7.1.26 in float64: absolute error below 1.5e-7, about float32's own resolution (torch's
    # float32 gelu is no closer to exact), and several times faster than math.erf element by element.
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.copysign(1.0 - poly * np.exp(-a * a), x)


def _gelu(x: Array) -> Array:
    wide = x.astype(np.float64)
    return (0.5 * wide * (1.0 + _erf(wide * math.sqrt(0.5)))).astype(np.float32)


ACTIVATIONS = {"quick_gelu": _quick_gelu, "gelu": _gelu}


@dataclass(frozen=True)
class VisionConfig:
    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    hidden_act: str
    feature_layer: int  # index into the tower's hidden states (0: the embeddings), as in the config
    select_strategy: str
    projector_hidden_act: str
    projector_bias: bool
    image_token_id: int
    text_hidden_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        """Feature rows per image: one per patch, plus the CLS row under the "full" strategy."""
        return self.patches_per_side**2 + (1 if self.select_strategy == "full" else 0)

    @property
    def layers_needed(self) -> int:
        """Encoder layers that run: the selected hidden state is the output of this many."""
        return self.feature_layer % (self.num_layers + 1)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path) -> VisionConfig:
        try:
            raw = json.loads((checkpoint_dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{checkpoint_dir}: cannot read config.json ({error})") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VisionConfig:
        model_type = raw.get("model_type")
        if model_type != "llava":
            raise ValueError(f"model type {model_type!r} is not supported for images: only LLaVA-1.5 ('llava')")
        defaults = _CLIP_VISION_DEFAULTS if raw.get("vision_config") is not None else _LLAVA_VISION_DEFAULTS
        vision = {**defaults, **(raw.get("vision_config") or {})}
        vision_type = vision.get("model_type", "clip_vision_model")
        if vision_type != "clip_vision_model":
            raise ValueError(f"vision tower {vision_type!r} is not supported: only CLIP ('clip_vision_model')")
        text = raw.get("text_config") or {}
        config = cls(
            image_size=_integer(vision, "image_size"),
            patch_size=_integer(vision, "patch_size"),
            num_channels=_integer(vision, "num_channels"),
            hidden_size=_integer(vision, "hidden_size"),
            intermediate_size=_integer(vision, "intermediate_size"),
            num_layers=_integer(vision, "num_hidden_layers"),
            num_heads=_integer(vision, "num_attention_heads"),
            layer_norm_eps=float(vision["layer_norm_eps"]),
            hidden_act=str(vision["hidden_act"]),
            feature_layer=_feature_layer(raw.get("vision_feature_layer", -2)),
            select_strategy=str(raw.get("vision_feature_select_strategy", "default")),
            projector_hidden_act=str(raw.get("projector_hidden_act", "gelu")),
            projector_bias=bool(raw.get("multimodal_projector_bias", True)),
            image_token_id=_integer(raw, "image_token_index", raw.get("image_token_id", 32000), minimum=0),
            text_hidden_size=_integer(text, "hidden_size", _LLAMA_HIDDEN_SIZE_DEFAULT),
        )
        config._validate()
        return config

    def _validate(self) -> None:
        if self.select_strategy not in SELECT_STRATEGIES:
            supported = ", ".join(SELECT_STRATEGIES)
            raise ValueError(
                f"vision_feature_select_strategy {self.select_strategy!r} is not supported; supported: {supported}"
            )
        activations = {"vision_config.hidden_act": self.hidden_act, "projector_hidden_act": self.projector_hidden_act}
        for name, act in activations.items():
            if act not in ACTIVATIONS:
                raise ValueError(f"{name} {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        if not -(self.num_layers + 1) <= self.feature_layer <= self.num_layers:
            states = self.num_layers + 1
            raise ValueError(f"vision_feature_layer {self.feature_layer} is outside the tower's {states} hidden states")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not a multiple of {self.num_heads} heads")
        if self.num_channels != 3:
            raise ValueError(f"vision num_channels {self.num_channels} is not supported: images are RGB")


def _integer(raw: dict[str, Any], key: str, default: Any = None, minimum: int = 1) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"config {key} must be an integer ≥ {minimum}, not {value!r}")
    return value


def _feature_layer(value: Any) -> int:
    if isinstance(value, list):
        raise ValueError("a list vision_feature_layer (features of several layers concatenated) is not supported")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"vision_feature_layer must be an integer, not {value!r}")
    return value


@dataclass(frozen=True)
class _EncoderLayer:
    norm1: tuple[Array, Array]
    q: tuple[Array, Array]
    k: tuple[Array, Array]
    v: tuple[Array, Array]
    out: tuple[Array, Array]
    norm2: tuple[Array, Array]
    fc1: tuple[Array, Array]
    fc2: tuple[Array, Array]


_LAYER_PARTS = {
    "norm1": "layer_norm1", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
    "out": "self_attn.out_proj", "norm2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
}  # fmt: skip


def _canonical_name(name: str) -> str | None:
    """transformers 5 saves `vision_tower.*` and `multi_modal_projector.*` (its in-memory names carry a `model.`
    prefix), published checkpoints `vision_tower.vision_model.*`: all map to `vision_tower.*`. Other tensors
    (the language model) give None."""
    name = name.removeprefix("model.")
    if name.startswith("vision_tower."):
        return "vision_tower." + name.removeprefix("vision_tower.").removeprefix("vision_model.")
    if name.startswith("multi_modal_projector."):
        return name
    return None


def _expected_shapes(config: VisionConfig) -> dict[str, tuple[int, ...]]:
    h, i, t = config.hidden_size, config.intermediate_size, config.text_hidden_size
    p, c = config.patch_size, config.num_channels
    shapes: dict[str, tuple[int, ...]] = {
        "vision_tower.embeddings.class_embedding": (h,),
        "vision_tower.embeddings.patch_embedding.weight": (h, c, p, p),
        "vision_tower.embeddings.position_embedding.weight": (config.patches_per_side**2 + 1, h),
        "vision_tower.pre_layrnorm.weight": (h,),
        "vision_tower.pre_layrnorm.bias": (h,),
        "multi_modal_projector.linear_1.weight": (t, h),
        "multi_modal_projector.linear_2.weight": (t, t),
    }
    if config.projector_bias:
        shapes["multi_modal_projector.linear_1.bias"] = (t,)
        shapes["multi_modal_projector.linear_2.bias"] = (t,)
    part_shapes = {
        "layer_norm1": (h,), "layer_norm2": (h,), "mlp.fc1": (i, h), "mlp.fc2": (h, i), "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h), "self_attn.out_proj": (h, h),
    }  # fmt: skip
    for layer in range(config.layers_needed):
        for part, shape in part_shapes.items():
            shapes[f"vision_tower.encoder.layers.{layer}.{part}.weight"] = shape
            shapes[f"vision_tower.encoder.layers.{layer}.{part}.bias"] = shape[:1]
    return shapes


def _weight_files(checkpoint_dir: Path) -> list[Path]:
    """The safetensors files holding vision tensors: with a shard index, only those it names for them."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index}: not a safetensors index ({error})") from None
        return [checkpoint_dir / f for f in sorted({f for n, f in weight_map.items() if _canonical_name(n)})]
    return sorted(checkpoint_dir.glob("*.safetensors"))


def load_vision_tensors(checkpoint_dir: Path, config: VisionConfig) -> dict[str, Array]:
    """The tensors the encoder needs, by canonical name, their shapes checked against the config."""
    expected = _expected_shapes(config)
    tensors: dict[str, Array] = {}
    for path in _weight_files(checkpoint_dir):
        for name, array in iter_safetensors(path):
            canonical = _canonical_name(name)
            if canonical not in expected:
                continue
            if canonical in tensors:
                raise CheckpointError(f"{checkpoint_dir}: tensor {canonical} appears twice (as {name})")
            if tuple(array.shape) != expected[canonical]:
                shape, wanted = tuple(array.shape), expected[canonical]
                raise CheckpointError(f"{checkpoint_dir}: tensor {name} has shape {shape}, the config implies {wanted}")
            tensors[canonical] = array
    missing = sorted(set(expected) - set(tensors))
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise CheckpointError(f"{checkpoint_dir}: vision tensors missing: {shown}")
    return tensors


class VisionEncoder:
    """CLIP vision tower + LLaVA projector over a batch of images (float32 numpy)."""

    def __init__(self, config: VisionConfig, tensors: dict[str, Array]) -> None:
        self.config = config
        hidden = config.hidden_size
        # The stride-p convolution without bias is one matmul over flattened (channel, row, column) patches.
        self._patch_weight = tensors["vision_tower.embeddings.patch_embedding.weight"].reshape(hidden, -1)
        self._class_embedding = tensors["vision_tower.embeddings.class_embedding"]
        self._position_embedding = tensors["vision_tower.embeddings.position_embedding.weight"]
        self._pre_norm = self._pair(tensors, "vision_tower.pre_layrnorm")
        self._layers = [self._layer(tensors, f"vision_tower.encoder.layers.{i}.") for i in range(config.layers_needed)]
        self._linear_1 = self._pair(tensors, "multi_modal_projector.linear_1")
        self._linear_2 = self._pair(tensors, "multi_modal_projector.linear_2")
        self._act = ACTIVATIONS[config.hidden_act]
        self._projector_act = ACTIVATIONS[config.projector_hidden_act]

    @classmethod
    def _layer(cls, tensors: dict[str, Array], prefix: str) -> _EncoderLayer:
        return _EncoderLayer(**{field: cls._pair(tensors, prefix + part) for field, part in _LAYER_PARTS.items()})

    @staticmethod
    def _pair(tensors: dict[str, Array], prefix: str) -> tuple[Array, Array]:
        weight = tensors[prefix + ".weight"]
        bias = tensors.get(prefix + ".bias")
        return weight, bias if bias is not None else np.zeros(weight.shape[0], dtype=np.float32)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path) -> VisionEncoder:
        config = VisionConfig.from_checkpoint(checkpoint_dir)
        return cls(config, load_vision_tensors(checkpoint_dir, config))

    def encode(self, pixel_values: npt.NDArray[np.floating[Any]]) -> Array:
        """[n_images, 3, H, W] pixel values to [n_images, tokens_per_image, text hidden size] image features."""
        config = self.config
        expected = (config.num_channels, config.image_size, config.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            wanted = ", ".join(str(d) for d in expected)
            raise ValueError(f"pixel values of shape {tuple(pixel_values.shape)}; the vision tower takes [n, {wanted}]")
        pixels = pixel_values.astype(np.float32, copy=False)
        n, grid, p = pixels.shape[0], config.patches_per_side, config.patch_size
        patches = pixels.reshape(n, config.num_channels, grid, p, grid, p).transpose(0, 2, 4, 1, 3, 5)
        embeddings = patches.reshape(n, grid * grid, -1) @ self._patch_weight.T
        cls_rows = np.broadcast_to(self._class_embedding, (n, 1, config.hidden_size))
        hidden = np.concatenate([cls_rows, embeddings], axis=1) + self._position_embedding
        hidden = _layer_norm(hidden, self._pre_norm, config.layer_norm_eps)
        for layer in self._layers:
            hidden = self._encoder_layer(hidden, layer)
        if config.select_strategy == "default":
            hidden = hidden[:, 1:]
        projected = self._projector_act(_linear(hidden, self._linear_1))
        return _linear(projected, self._linear_2)

    def _encoder_layer(self, hidden: Array, layer: _EncoderLayer) -> Array:
        eps = self.config.layer_norm_eps
        hidden = hidden + self._attention(_layer_norm(hidden, layer.norm1, eps), layer)
        return hidden + _linear(self._act(_linear(_layer_norm(hidden, layer.norm2, eps), layer.fc1)), layer.fc2)

    def _attention(self, x: Array, layer: _EncoderLayer) -> Array:
        n, length, _ = x.shape
        heads, head_dim = self.config.num_heads, self.config.head_dim

        def split(projection: tuple[Array, Array]) -> Array:
            return _linear(x, projection).reshape(n, length, heads, head_dim).transpose(0, 2, 1, 3)

        q, k, v = split(layer.q), split(layer.k), split(layer.v)
        scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(head_dim**-0.5)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        attended = (probs @ v).transpose(0, 2, 1, 3).reshape(n, length, heads * head_dim)
        return _linear(attended, layer.out)


def _linear(x: Array, weight_bias: tuple[Array, Array]) -> Array:
    weight, bias = weight_bias
    return (x @ weight.T + bias).astype(np.float32, copy=False)


def _layer_norm(x: Array, weight_bias: tuple[Array, Array], eps: float) -> Array:
    weight, bias = weight_bias
    centered: Array = x - x.mean(axis=-1, keepdims=True)
    variance: Array = (centered * centered).mean(axis=-1, keepdims=True)
    normed: Array = centered / np.sqrt(variance + np.float32(eps))
    return normed * weight + bias
