"""The Llama-family decoder forward pass in numpy: the generation math.

One call runs a *ragged batch*: any mix of sequences, each contributing some new tokens (a whole
prompt, a chunk of one, or the single token of a decode step). All token rows go through the dense
layers together, so every weight matrix is read once per step however many sequences are active;
only attention runs per sequence, against that sequence's own cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt

from cpu_engine.config import ModelConfig
from cpu_engine.errors import CheckpointError
from cpu_engine.kv_cache import SequenceKVCache
from cpu_engine.lora import LoraAdapter, add_lora
from cpu_engine.rope import RotaryTable, inverse_frequencies
from cpu_engine.safetensors_reader import load_checkpoint_tensors

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass
class Segment:
    """New tokens of one sequence in a forward step; they start at position `cache.length`."""

    cache: SequenceKVCache
    token_ids: IntArray
    adapter: LoraAdapter | None = None  # this sequence's LoRA adapter (None: the base model)
    prompt_table: FloatArray | None = None  # rows for token ids >= vocab_size (GenerationRequest.prompt_table)


@dataclass
class _Layer:
    input_norm: FloatArray
    # Weights keep the checkpoint's [out, in] layout; see _linear.
    qkv: FloatArray  # [(heads + 2 * kv_heads) * head_dim, hidden]: q, k and v projections fused
    qkv_bias: FloatArray | None
    out: FloatArray  # [hidden, heads * head_dim]
    post_norm: FloatArray
    gate_up: FloatArray  # [2 * intermediate, hidden]: gate and up projections fused
    down: FloatArray  # [hidden, intermediate]


def _rms_norm(x: FloatArray, weight: FloatArray, eps: float) -> FloatArray:
    variance = np.mean(np.square(x), axis=-1, keepdims=True)
    return cast(FloatArray, (x / np.sqrt(variance + np.float32(eps))) * weight)


def _linear(x: FloatArray, weight: FloatArray) -> FloatArray:
    """x [tokens, in] times weight [out, in] transposed: [tokens, out] (possibly a transposed view).

    With the weight as the left operand, OpenBLAS measured up to 25% faster than `x @ weight.T` for
    batched decode steps (4-16 rows) and no slower for one row; it also keeps the checkpoint's layout,
    so loading needs no transposed copies. For two rows, OpenBLAS's skinny matrix product is so slow
    (it repacks the whole weight) that two matrix-vector products measured 1.6x faster.
    """
    if x.shape[0] == _ROWS_AS_VECTOR_PRODUCTS:
        out = np.empty((x.shape[0], weight.shape[0]), dtype=np.float32)
        for row in range(x.shape[0]):
            np.matmul(weight, x[row], out=out[row])
        return out
    return cast(FloatArray, (weight @ x.T).T)


_ROWS_AS_VECTOR_PRODUCTS = 2
_VOCAB_CHUNK = 4096


def _vocab_logits(hidden: FloatArray, lm_head: FloatArray) -> FloatArray:
    """hidden [rows, hidden] times the [vocab, hidden] head: [rows, vocab] logits, contiguous.

    For several rows the vocabulary is taken in chunks of _VOCAB_CHUNK: OpenBLAS's skinny matrix
    product over the whole 49k-row head of SmolLM2 ran at half the speed of the same product in
    chunks (9.1 vs 7.1 ms for 16 rows; benchmarks in the README).
    """
    if hidden.shape[0] <= _ROWS_AS_VECTOR_PRODUCTS:
        return np.ascontiguousarray(_linear(hidden, lm_head))
    transposed = np.empty((lm_head.shape[0], hidden.shape[0]), dtype=np.float32)
    columns = hidden.T
    for start in range(0, lm_head.shape[0], _VOCAB_CHUNK):
        stop = start + _VOCAB_CHUNK
        np.matmul(lm_head[start:stop], columns, out=transposed[start:stop])
    return np.ascontiguousarray(transposed.T)


def _adapter_rows(segments: list[Segment], lengths: list[int]) -> list[tuple[slice | IntArray, LoraAdapter]]:
    """The rows of each adapter in the batch, all its sequences together: one slice when they are adjacent,
    else an index array. One pair of low-rank products per adapter, not per sequence."""
    rows_by_adapter: dict[int, tuple[LoraAdapter, list[range]]] = {}
    row = 0
    for segment, n in zip(segments, lengths, strict=True):
        if segment.adapter is not None:
            ranges = rows_by_adapter.setdefault(id(segment.adapter), (segment.adapter, []))[1]
            if ranges and ranges[-1].stop == row:
                ranges[-1] = range(ranges[-1].start, row + n)
            else:
                ranges.append(range(row, row + n))
        row += n
    groups: list[tuple[slice | IntArray, LoraAdapter]] = []
    for adapter, ranges in rows_by_adapter.values():
        if len(ranges) == 1:
            groups.append((slice(ranges[0].start, ranges[0].stop), adapter))
        else:
            groups.append((np.concatenate([np.arange(r.start, r.stop) for r in ranges]), adapter))
    return groups


# A vision-language checkpoint's language model under its Llama names (transformers 5 and 4.x layouts).
_LANGUAGE_MODEL_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                            ("language_model.lm_head.", "lm_head."))  # fmt: skip


def _language_model_tensors(tensors: dict[str, FloatArray]) -> dict[str, FloatArray]:
    renamed = {}
    for name, tensor in tensors.items():
        for prefix, replacement in _LANGUAGE_MODEL_PREFIXES:
            if name.startswith(prefix):
                renamed[replacement + name[len(prefix) :]] = tensor
                break
        else:
            if name.startswith("lm_head."):
                renamed[name] = tensor
    return renamed


def _silu(x: FloatArray) -> FloatArray:
    return cast(FloatArray, x / (np.float32(1) + np.exp(-x)))


class LlamaModel:
    """Weights in the layout the math wants, and the forward pass."""

    def __init__(self, config: ModelConfig, tensors: dict[str, FloatArray]) -> None:
        self.config = config
        c = config
        self.q_width = c.num_heads * c.head_dim
        self.kv_width = c.num_kv_heads * c.head_dim
        self.group = c.num_heads // c.num_kv_heads
        self.scale = np.float32(1.0 / np.sqrt(c.head_dim))

        def take(name: str) -> FloatArray:
            if name not in tensors:
                raise CheckpointError(f"checkpoint has no tensor {name!r}")
            return tensors.pop(name)

        self.embed = np.ascontiguousarray(take("model.embed_tokens.weight"))
        if self.embed.shape != (c.vocab_size, c.hidden_size):
            raise CheckpointError(f"embedding shape {self.embed.shape} disagrees with config.json")
        self.layers: list[_Layer] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            q, k, v = (take(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            bias = None
            # Qwen2-style checkpoints carry q/k/v biases; their presence, not a config flag, decides.
            if p + "self_attn.q_proj.bias" in tensors:
                bias = np.concatenate([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            self.layers.append(
                _Layer(
                    input_norm=take(p + "input_layernorm.weight"),
                    qkv=np.concatenate([q, k, v]),
                    qkv_bias=bias,
                    out=np.ascontiguousarray(take(p + "self_attn.o_proj.weight")),
                    post_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=np.concatenate([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
                    down=np.ascontiguousarray(take(p + "mlp.down_proj.weight")),
                )
            )
        self.final_norm = take("model.norm.weight")
        lm_head = tensors.pop("lm_head.weight", None)
        if lm_head is None and not c.tie_word_embeddings:
            raise CheckpointError("checkpoint has no lm_head.weight and does not tie word embeddings")
        # [vocab, hidden]; a tied head is the embedding matrix itself.
        self.lm_head = self.embed if lm_head is None else np.ascontiguousarray(lm_head)
        inv_freq, attention_factor = inverse_frequencies(
            c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings
        )
        self.rotary = RotaryTable(c.head_dim, inv_freq, attention_factor, c.max_position_embeddings)
        # Where each LoRA target module's output lives inside the fused products.
        qw, kvw, inter = self.q_width, self.kv_width, c.intermediate_size
        self._qkv_columns = (("q_proj", 0, qw), ("k_proj", qw, qw + kvw), ("v_proj", qw + kvw, qw + 2 * kvw))
        self._out_columns = (("o_proj", 0, c.hidden_size),)
        self._gate_up_columns = (("gate_proj", 0, inter), ("up_proj", inter, 2 * inter))
        self._down_columns = (("down_proj", 0, c.hidden_size),)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path) -> LlamaModel:
        config = ModelConfig.from_checkpoint(checkpoint_dir)
        tensors = load_checkpoint_tensors(checkpoint_dir)
        return cls(config, _language_model_tensors(tensors) if config.accepts_images else tensors)

    def _embed(self, segments: list[Segment], token_ids: IntArray) -> FloatArray:
        """Token embeddings; ids past the vocabulary take their rows from the segment's prompt table."""
        vocab = self.config.vocab_size
        beyond = token_ids >= vocab
        if not beyond.any():
            return self.embed[token_ids]
        x: FloatArray = self.embed[np.where(beyond, 0, token_ids)]
        row = 0
        for segment in segments:
            n = len(segment.token_ids)
            fake = np.flatnonzero(beyond[row : row + n])
            if fake.size:
                assert segment.prompt_table is not None  # the engine checked the ids against the table
                x[row + fake] = segment.prompt_table[token_ids[row + fake] - vocab]
            row += n
        return x

    def forward(self, segments: list[Segment], wants_logits: list[bool] | None = None) -> FloatArray:
        """Run the new tokens of every segment and extend their caches.

        Returns the logits of each segment's last token [segments that want logits, vocab]; all by default.
        """
        c = self.config
        lengths = [len(s.token_ids) for s in segments]
        token_ids = np.concatenate([s.token_ids for s in segments])
        positions = np.concatenate(
            [
                np.arange(s.cache.length, s.cache.length + n, dtype=np.int64)
                for s, n in zip(segments, lengths, strict=True)
            ]
        )
        for s, n in zip(segments, lengths, strict=True):
            if s.cache.length + n > s.cache.capacity:
                raise ValueError("segment exceeds its sequence's reserved cache")
        x = self._embed(segments, token_ids)
        lora = _adapter_rows(segments, lengths)
        for index, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm, c.rms_norm_eps)
            qkv = np.ascontiguousarray(_linear(h, layer.qkv))
            if layer.qkv_bias is not None:
                qkv += layer.qkv_bias
            if lora:
                add_lora(qkv, h, lora, index, self._qkv_columns)
            # q and k heads side by side, rotated in place inside qkv: one rotation, no copies.
            qk = qkv[:, : self.q_width + self.kv_width].reshape(-1, c.num_heads + c.num_kv_heads, c.head_dim)
            self.rotary.apply(qk, positions)
            q = qk[:, : c.num_heads]
            q *= self.scale
            k = qk[:, c.num_heads :]
            v = qkv[:, self.q_width + self.kv_width :].reshape(-1, c.num_kv_heads, c.head_dim)
            attention = np.empty((len(token_ids), self.q_width), dtype=np.float32)
            row = 0
            for segment, n in zip(segments, lengths, strict=True):
                rows = slice(row, row + n)
                attention[rows] = self._attend(index, segment.cache, q[rows], k[rows], v[rows])
                row += n
            projected = _linear(attention, layer.out)
            if lora:
                add_lora(projected, attention, lora, index, self._out_columns)
            x = x + projected
            h = _rms_norm(x, layer.post_norm, c.rms_norm_eps)
            gate_up = _linear(h, layer.gate_up)
            if lora:
                add_lora(gate_up, h, lora, index, self._gate_up_columns)
            activated = _silu(gate_up[:, : c.intermediate_size]) * gate_up[:, c.intermediate_size :]
            down = _linear(activated, layer.down)
            if lora:
                add_lora(down, activated, lora, index, self._down_columns)
            x = x + down
        for s, n in zip(segments, lengths, strict=True):
            s.cache.length += n
        last_rows = np.cumsum(lengths) - 1
        if wants_logits is not None:
            last_rows = last_rows[np.asarray(wants_logits, dtype=bool)]
        hidden = _rms_norm(x[last_rows], self.final_norm, c.rms_norm_eps)
        return _vocab_logits(hidden, self.lm_head)

    def _attend(self, layer: int, cache: SequenceKVCache, q: FloatArray, k: FloatArray, v: FloatArray) -> FloatArray:
        """Causal attention of n new query tokens (already scaled) over the sequence's cache plus themselves."""
        n = q.shape[0]
        start = cache.length
        total = start + n
        keys = cache.keys[layer]
        values = cache.values[layer]
        kv_heads, group, head_dim = self.config.num_kv_heads, self.group, self.config.head_dim
        if n == 1:
            # Decode: the hot path, kept to as few numpy calls as possible (views, no copies of K/V).
            keys[:, start] = k[0]
            values[:, start] = v[0]
            scores = q[0].reshape(kv_heads, group, head_dim) @ keys[:, :total].transpose(0, 2, 1)
        else:
            keys[:, start:total] = k.transpose(1, 0, 2)
            values[:, start:total] = v.transpose(1, 0, 2)
            # Rows are (token, query head of the group) for each kv head: grouped-query attention, no K/V copies.
            queries = (
                q.reshape(n, kv_heads, group, head_dim).transpose(1, 0, 2, 3).reshape(kv_heads, n * group, head_dim)
            )
            scores = queries @ keys[:, :total].transpose(0, 2, 1)  # [kv_heads, n * group, total]
            query_positions = start + np.arange(n).repeat(group)
            scores[:, np.arange(total)[None, :] > query_positions[:, None]] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        # Normalise after multiplying by V: the divide then runs on [.., head_dim] instead of [.., total].
        out = (scores @ values[:, :total]) / scores.sum(axis=-1, keepdims=True)
        if n == 1:
            return out.reshape(1, -1)  # type: ignore[no-any-return]
        return out.reshape(kv_heads, n, group, head_dim).transpose(1, 0, 2, 3).reshape(n, -1)  # type: ignore[no-any-return]
