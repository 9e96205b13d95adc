"""LoRA adapters for the CPU engine: loaded from the Hugging Face PEFT format and applied per sequence.

An adapter adds, for each target module m of each layer, `scaling * (x @ A_m.T) @ B_m.T` to the module's
output, with A_m [rank, in], B_m [out, rank] and scaling = lora_alpha / rank (PEFT's default, non-rsLoRA
scaling). Sequences with different adapters, and without one, share a forward pass: the base products run
once for the whole batch, each adapter's low-rank products only over its own rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cpu_engine.config import ModelConfig
from cpu_engine.errors import CheckpointError
from cpu_engine.safetensors_reader import iter_safetensors

FloatArray = npt.NDArray[np.float32]

# Module names as PEFT and Hugging Face Llama call them, in the engine's fused layout order.
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_TENSOR = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LoraModule:
    a: FloatArray  # [rank, in]
    b: FloatArray  # [out, rank], already multiplied by the scaling


@dataclass(frozen=True)
class LoraAdapter:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    layers: tuple[dict[str, LoraModule], ...]  # per layer: module name → its low-rank pair
    # (layer, fused output layout) → the modules that share one input, as one A and one block-diagonal B
    _fused: dict[tuple[int, tuple[tuple[str, int, int], ...]], _FusedSite | None] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def fused(self, layer: int, modules: tuple[tuple[str, int, int], ...]) -> _FusedSite | None:
        """The low-rank update of every module here that reads the same input (q, k and v; gate and up) as one
        pair of products: A stacked [n * rank, in], B block-diagonal [columns, n * rank]. Two matrix products
        per site instead of two per module: at decode sizes the call count, not the arithmetic, is the cost."""
        key = (layer, modules)
        if key not in self._fused:
            present = [(name, start, stop) for name, start, stop in modules if name in self.layers[layer]]
            site = None
            if present:
                first, last = min(s for _, s, _ in present), max(e for _, _, e in present)
                pairs = [self.layers[layer][name] for name, _, _ in present]
                b = np.zeros((last - first, self.rank * len(present)), dtype=np.float32)
                for index, ((_, start, stop), pair) in enumerate(zip(present, pairs, strict=True)):
                    b[start - first : stop - first, index * self.rank : (index + 1) * self.rank] = pair.b
                site = _FusedSite(np.ascontiguousarray(np.vstack([p.a for p in pairs])), b, first, last)
            self._fused[key] = site
        return self._fused[key]


@dataclass(frozen=True)
class _FusedSite:
    a: FloatArray  # [n * rank, in]
    b: FloatArray  # [last - first, n * rank]
    first: int  # the output columns it adds to
    last: int


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each target module for this model."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {
        "q_proj": (q, c.hidden_size),
        "k_proj": (kv, c.hidden_size),
        "v_proj": (kv, c.hidden_size),
        "o_proj": (c.hidden_size, q),
        "gate_proj": (c.intermediate_size, c.hidden_size),
        "up_proj": (c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size),
    }


def load_peft_adapter(adapter_dir: Path, config: ModelConfig, max_rank: int | None = None) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter against the base model's config; every problem names itself."""
    config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for required in (config_file, weights_file):
        if not required.is_file():
            raise CheckpointError(f"{adapter_dir} is not a PEFT LoRA adapter: {required.name} is missing")
    try:
        settings = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file}: not valid JSON ({error})") from None
    if str(settings.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{config_file}: peft_type {settings.get('peft_type')!r} is not LORA")
    if settings.get("use_rslora") or settings.get("use_dora"):
        raise CheckpointError(f"{config_file}: rsLoRA and DoRA adapters are not supported")
    # Per-module ranks or scalings would be applied wrongly by one rank and one alpha: refused, not ignored.
    patterns = [name for name in ("rank_pattern", "alpha_pattern") if settings.get(name)]
    if patterns:
        raise CheckpointError(f"{config_file}: per-module {' and '.join(patterns)} are not supported")
    # PEFT's defaults where the file leaves them out (LoraConfig: r=8, lora_alpha=8).
    rank, alpha = int(settings.get("r", 8)), float(settings.get("lora_alpha", 8))
    if rank < 1:
        raise CheckpointError(f"{config_file}: rank r must be at least 1, not {rank}")
    if max_rank is not None and rank > max_rank:
        raise CheckpointError(f"adapter rank {rank} is above the engine's maximum LoRA rank of {max_rank}")
    targets = settings.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = sorted(set(targets) - set(MODULES))
    if unknown:
        raise CheckpointError(f"{config_file}: target modules {unknown} are not among {list(MODULES)}")
    shapes = module_shapes(config)
    layers: list[dict[str, dict[str, FloatArray]]] = [{} for _ in range(config.num_layers)]
    for name, tensor in iter_safetensors(weights_file):
        match = _TENSOR.search(name)
        if match is None:
            raise CheckpointError(f"{weights_file.name}: unexpected tensor {name!r} (only LoRA A/B weights)")
        layer, module, which = int(match[1]), match[2], match[3]
        if layer >= config.num_layers or module not in shapes:
            raise CheckpointError(f"{weights_file.name}: {name!r} does not fit a {config.num_layers}-layer Llama")
        layers[layer].setdefault(module, {})[which] = np.asarray(tensor, dtype=np.float32)
    modules: list[dict[str, LoraModule]] = []
    for index, found in enumerate(layers):
        built = {}
        for module, pair in found.items():
            out_size, in_size = shapes[module]
            a, b = pair.get("A"), pair.get("B")
            if a is None or b is None:
                raise CheckpointError(f"layer {index} {module}: lora_A and lora_B must both be present")
            if a.shape != (rank, in_size) or b.shape != (out_size, rank):
                raise CheckpointError(
                    f"layer {index} {module}: LoRA shapes {a.shape} and {b.shape} do not fit the base model "
                    f"(expected {(rank, in_size)} and {(out_size, rank)})"
                )
            built[module] = LoraModule(np.ascontiguousarray(a), np.ascontiguousarray(b * np.float32(alpha / rank)))
        modules.append(built)
    if not any(modules):
        raise CheckpointError(f"{weights_file.name}: no LoRA weights")
    present = sorted({m for layer in modules for m in layer})
    return LoraAdapter(rank=rank, alpha=alpha, target_modules=tuple(present), layers=tuple(modules))


def add_lora(out: FloatArray, x: FloatArray, groups: list[tuple[slice | npt.NDArray[np.intp], LoraAdapter]], layer: int,
             modules: tuple[tuple[str, int, int], ...]) -> None:  # fmt: skip
    """Add each adapter's low-rank update, over its rows, to the columns of the fused output it targets.

    `modules` lists (module name, first column, last column) inside `out`, e.g. q, k and v inside the fused
    qkv product."""
    for rows, adapter in groups:
        site = adapter.fused(layer, modules)
        if site is not None:
            out[rows, site.first : site.last] += (x[rows] @ site.a.T) @ site.b.T


# ---- TensorRT-LLM's LoRA tensors (`lora_weights`, `lora_config`) -----------------------------------------
# One row per (module, layer): A [rank, in] flattened, then B [out, rank] (scaled) flattened, zero-padded to
# the longest row; the matching `lora_config` row is [module id, layer, rank]. TensorRT-LLM names the gated
# MLP's projections after GPT's (its `fc` is Llama's gate_proj, its `gate` is Llama's up_proj).
TRTLLM_MODULES = {
    "q_proj": ("attn_q", 1),
    "k_proj": ("attn_k", 2),
    "v_proj": ("attn_v", 3),
    "o_proj": ("attn_dense", 4),
    "gate_proj": ("mlp_h_to_4h", 5),
    "down_proj": ("mlp_4h_to_h", 6),
    "up_proj": ("mlp_gate", 7),
}
_MODULE_BY_ID = {module_id: name for name, (_, module_id) in TRTLLM_MODULES.items()}


def to_trtllm(adapter: LoraAdapter) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.int32]]:
    """(lora_weights [rows, width] float16, lora_config [rows, 3] int32) for one adapter."""
    rows: list[FloatArray] = []
    config: list[tuple[int, int, int]] = []
    for layer, modules in enumerate(adapter.layers):
        for name in MODULES:
            pair = modules.get(name)
            if pair is not None:
                rows.append(np.concatenate([pair.a.reshape(-1), pair.b.reshape(-1)]))
                config.append((TRTLLM_MODULES[name][1], layer, adapter.rank))
    width = max(row.size for row in rows)
    weights = np.zeros((len(rows), width), dtype=np.float16)
    for index, row in enumerate(rows):
        weights[index, : row.size] = row
    return weights, np.array(config, dtype=np.int32).reshape(-1, 3)


def from_trtllm(
    weights: npt.NDArray[np.generic], config: npt.NDArray[np.generic], model: ModelConfig,
    max_rank: int, allowed_modules: tuple[str, ...] = MODULES,
) -> LoraAdapter:  # fmt: skip
    """The adapter that TensorRT-LLM-style `lora_weights` / `lora_config` describe; ValueError says what is wrong."""
    weights = np.asarray(weights)
    config = np.asarray(config)
    if weights.ndim == 3 and weights.shape[0] == 1:  # with the batch dimension
        weights = weights[0]
    if config.ndim == 3 and config.shape[0] == 1:
        config = config[0]
    if config.ndim != 2 or config.shape[1] != 3:
        raise ValueError(f"lora_config must be [modules, 3], not {list(config.shape)}")
    if weights.ndim != 2 or weights.shape[0] != config.shape[0]:
        raise ValueError(
            f"lora_weights {list(weights.shape)} must have one row per lora_config row ({config.shape[0]})"
        )
    shapes = module_shapes(model)
    layers: list[dict[str, LoraModule]] = [{} for _ in range(model.num_layers)]
    ranks = set()
    for row, (module_id, layer, rank) in zip(weights, config.tolist(), strict=True):
        name = _MODULE_BY_ID.get(module_id)
        if name is None:
            raise ValueError(f"lora_config: module id {module_id} is not one of {sorted(_MODULE_BY_ID)}")
        if name not in allowed_modules:
            raise ValueError(f"LoRA module {TRTLLM_MODULES[name][0]} ({name}) is not enabled in this engine")
        if not 0 <= layer < model.num_layers:
            raise ValueError(f"lora_config: layer {layer} is outside the model's {model.num_layers} layers")
        if not 1 <= rank <= max_rank:
            raise ValueError(f"LoRA rank {rank} is outside 1..{max_rank}, the engine's maximum LoRA rank")
        out_size, in_size = shapes[name]
        a_size, b_size = rank * in_size, out_size * rank
        if row.size < a_size + b_size:
            raise ValueError(f"lora_weights: the row for layer {layer} {name} is shorter than rank {rank} needs")
        values = row.astype(np.float32)
        a = values[:a_size].reshape(rank, in_size)
        b = values[a_size : a_size + b_size].reshape(out_size, rank)
        layers[layer][name] = LoraModule(np.ascontiguousarray(a), np.ascontiguousarray(b))
        ranks.add(rank)
    if len(ranks) != 1:
        raise ValueError(f"lora_config: one adapter has one rank, not {sorted(ranks) or 'none'}")
    rank = ranks.pop()
    present = tuple(sorted({m for layer_modules in layers for m in layer_modules}))
    # B arrives already scaled: alpha = rank makes the scaling 1.
    return LoraAdapter(rank=rank, alpha=float(rank), target_modules=present, layers=tuple(layers))
