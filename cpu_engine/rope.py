"""Rotary position embeddings: inverse frequencies for each `rope_scaling` kind, and the cos/sin tables.

The formulas follow the published definitions (and Hugging Face `transformers`, which the tests compare
against): plain RoPE, linear position interpolation, Llama 3 frequency smoothing, and YaRN.
Dynamic NTK scaling re-rotates cached keys as the sequence grows, which a KV cache cannot do, so it is
refused rather than silently approximated.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from cpu_engine.errors import CheckpointError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

FloatArray = npt.NDArray[np.float32]


def inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_position_embeddings: int
) -> tuple[FloatArray, float]:
    """(inverse frequencies [head_dim / 2], attention factor that scales cos and sin)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    base_inv = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if scaling is None or kind == "default":
        return base_inv, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return (base_inv / np.float32(factor)).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3(base_inv, scaling, factor), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, factor, max_position_embeddings)
    raise CheckpointError(f"rope_scaling type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


def _llama3(inv: FloatArray, scaling: dict[str, Any], factor: float) -> FloatArray:
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_freq_wavelen, inv / factor, inv)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(
    head_dim: int, theta: float, scaling: dict[str, Any], factor: float, max_position_embeddings: int
) -> tuple[FloatArray, float]:
    original = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (factor * pos_freqs)
    inv = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv.astype(np.float32), float(attention_factor)


class RotaryTable:
    """cos/sin for every position up to the model's context, computed once."""

    def __init__(self, head_dim: int, inv_freq: FloatArray, attention_factor: float, max_positions: int) -> None:
        positions = np.arange(max_positions, dtype=np.float32)
        angles = np.outer(positions, inv_freq).astype(np.float32)  # [positions, head_dim / 2]
        self.cos = (np.cos(angles) * attention_factor).astype(np.float32)
        self.sin = (np.sin(angles) * attention_factor).astype(np.float32)
        self.half = head_dim // 2

    def apply(self, x: FloatArray, positions: npt.NDArray[np.int64]) -> FloatArray:
        """Rotate x [tokens, heads, head_dim] in place (the "rotate half" layout) and return it."""
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        first = x[..., : self.half].copy()
        second = x[..., self.half :]
        x[..., : self.half] = first * cos - second * sin
        x[..., self.half :] = second * cos + first * sin
        return x
