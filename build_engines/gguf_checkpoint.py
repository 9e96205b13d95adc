"""Convert a GGUF file (llama.cpp's format) into a Hugging Face checkpoint directory.

Weights are dequantized to float32, so the checkpoint is exactly the model llama.cpp runs from this
file. llama.cpp's converter permutes the rows of the Q and K projections for its interleaved rotary
layout; Hugging Face's Llama uses the "rotate half" layout, so those rows are permuted back here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from build_engines.gguf_tokenizer import GGUFTokenizerData, build_tokenizer
from build_engines.hf_checkpoint import LlamaShape, SpecialTokens, check_output_dir, write_checkpoint
from cpu_engine.errors import CheckpointError

# GGUF architectures whose decoder is the Llama block, and whether llama.cpp permuted their Q/K rows.
_ARCHITECTURES = {"llama": True}

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute_rotary_rows(weight: npt.NDArray[np.float32], num_heads: int) -> npt.NDArray[np.float32]:
    """Undo llama.cpp's per-head interleaving of rotary rows ([out, in] weight)."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


# Integer and float64 tensors are not weights of a Llama model as llama.cpp writes it.
_NOT_WEIGHT_TYPES = frozenset(
    {GGMLQuantizationType.I8, GGMLQuantizationType.I16, GGMLQuantizationType.I32, GGMLQuantizationType.I64,
     GGMLQuantizationType.F64}
)  # fmt: skip
# Llama 3.1's rope scaling, which llama.cpp stores as per-frequency factors instead of rope_scaling's parameters.
_ROPE_FACTORS = "rope_freqs.weight"


class GGUFFile:
    """Typed access to one GGUF file's metadata and tensors."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except Exception as error:  # the reader raises whatever its parsing hits on a foreign or cut file
            raise CheckpointError(f"{path.name}: not a readable GGUF file ({error})") from None

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise CheckpointError(f"{self.path.name}: metadata key {key!r} is missing")
        return value

    def tensor_names(self) -> list[str]:
        return [tensor.name for tensor in self.reader.tensors]

    def check_tensor_types(self) -> None:
        for tensor in self.reader.tensors:
            kind = GGMLQuantizationType(tensor.tensor_type)
            if kind in _NOT_WEIGHT_TYPES:
                raise CheckpointError(
                    f"{self.path.name}: tensor {tensor.name!r} has type {kind.name}, not a weight type"
                )

    def tensors(self) -> dict[str, npt.NDArray[np.float32]]:
        out: dict[str, npt.NDArray[np.float32]] = {}
        for tensor in self.reader.tensors:
            kind = GGMLQuantizationType(tensor.tensor_type)
            try:
                array = dequantize(tensor.data, kind) if kind != GGMLQuantizationType.F32 else np.asarray(tensor.data)
            except NotImplementedError:
                raise CheckpointError(
                    f"{self.path.name}: tensor {tensor.name!r} has type {kind.name}, which the gguf library cannot read"
                ) from None
            out[tensor.name] = np.asarray(array, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
        return out


def read_shape(gguf: GGUFFile, arch: str, has_output: bool) -> LlamaShape:
    num_heads = int(gguf.require(f"{arch}.attention.head_count"))
    hidden = int(gguf.require(f"{arch}.embedding_length"))
    tokens = gguf.require("tokenizer.ggml.tokens")
    rope_scaling = None
    scaling_type = gguf.get(f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        rope_scaling = {"rope_type": scaling_type, "factor": float(gguf.require(f"{arch}.rope.scaling.factor"))}
        original = gguf.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            rope_scaling["original_max_position_embeddings"] = int(original)
    return LlamaShape(
        vocab_size=int(gguf.get(f"{arch}.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(gguf.require(f"{arch}.feed_forward_length")),
        num_layers=int(gguf.require(f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(gguf.get(f"{arch}.attention.head_count_kv", num_heads)),
        max_position_embeddings=int(gguf.require(f"{arch}.context_length")),
        rope_theta=float(gguf.get(f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(gguf.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings=not has_output,
        head_dim=int(gguf.get(f"{arch}.attention.key_length", hidden // num_heads)),
        rope_scaling=rope_scaling,
    )


def read_special_tokens(gguf: GGUFFile) -> SpecialTokens:
    tokens: list[str] = gguf.require("tokenizer.ggml.tokens")

    def token_id(key: str) -> int | None:
        value = gguf.get(f"tokenizer.ggml.{key}_token_id")
        return None if value is None else int(value)

    eos_id = token_id("eos")
    if eos_id is None:
        raise CheckpointError(f"{gguf.path.name}: no end-of-sequence token id")
    for kind in ("eos", "eot", "eom", "bos", "unknown", "padding"):
        value = token_id(kind)
        if value is not None and not 0 <= value < len(tokens):
            raise CheckpointError(
                f"{gguf.path.name}: tokenizer.ggml.{kind}_token_id {value} is outside the"
                f" {len(tokens)}-token vocabulary"
            )
    # Chat models often end turns with a separate token (Llama 3's <|eot_id|>): every one ends generation.
    end_ids = tuple(dict.fromkeys(i for i in (eos_id, token_id("eot"), token_id("eom")) if i is not None))
    bos_id, unk_id, pad_id = token_id("bos"), token_id("unknown"), token_id("padding")
    return SpecialTokens(
        bos=None if bos_id is None else tokens[bos_id],
        eos=tokens[eos_id],
        unk=None if unk_id is None else tokens[unk_id],
        pad=None if pad_id is None else tokens[pad_id],
        end_ids=end_ids,
        bos_id=bos_id,
        pad_id=pad_id,
        add_bos=bool(gguf.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=gguf.get("tokenizer.chat_template"),
    )


def _llama_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (before any layer's rows are permuted back), or None."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}"
    return None


def check_tensor_names(names: list[str]) -> None:
    for name in names:
        if name == _ROPE_FACTORS:
            raise CheckpointError(
                f"GGUF tensor {name!r} holds Llama 3.1-style rope scaling as per-frequency factors, which this"
                " converter does not turn back into config.json's rope_scaling; serve the model's Hugging Face"
                " checkpoint instead (the engine reads it directly)"
            )
        if _llama_name(name) is None:
            raise CheckpointError(f"GGUF tensor {name!r} has no Llama equivalent")


def convert_tensors(raw: dict[str, npt.NDArray[np.float32]], shape: LlamaShape, permuted: bool) -> dict[str, Any]:
    tensors: dict[str, npt.NDArray[np.float32]] = {}
    for name, array in raw.items():
        llama_name = _llama_name(name)
        if llama_name is None:
            raise CheckpointError(f"GGUF tensor {name!r} has no Llama equivalent")
        if permuted and name.endswith(".attn_q.weight"):
            array = unpermute_rotary_rows(array, shape.num_heads)
        elif permuted and name.endswith(".attn_k.weight"):
            array = unpermute_rotary_rows(array, shape.num_kv_heads)
        tensors[llama_name] = array
    return tensors


def gguf_source(gguf_path: Path) -> str:
    """How a checkpoint converted from this file records its source (hf_checkpoint.SOURCE_FILE)."""
    return f"{gguf_path.name} {gguf_path.stat().st_size}"


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Convert gguf_path into a Hugging Face checkpoint in out_dir.

    Everything that can refuse the file is checked from its metadata first: dequantizing every tensor to
    float32 takes the time and memory of the whole model.
    """
    check_output_dir(out_dir)
    gguf = GGUFFile(gguf_path)
    arch = gguf.require("general.architecture")
    if arch not in _ARCHITECTURES:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(_ARCHITECTURES)}")
    names = gguf.tensor_names()
    check_tensor_names(names)
    gguf.check_tensor_types()
    shape = read_shape(gguf, arch, has_output="output.weight" in names)
    special = read_special_tokens(gguf)
    tokenizer = build_tokenizer(
        GGUFTokenizerData(
            model=gguf.require("tokenizer.ggml.model"),
            pre=gguf.get("tokenizer.ggml.pre", "default"),
            tokens=gguf.require("tokenizer.ggml.tokens"),
            token_types=gguf.get("tokenizer.ggml.token_type", []),
            merges=gguf.get("tokenizer.ggml.merges", []),
            bos_id=gguf.get("tokenizer.ggml.bos_token_id"),
            add_bos=bool(gguf.get("tokenizer.ggml.add_bos_token", False)),
        )
    )
    tensors = convert_tensors(gguf.tensors(), shape, permuted=_ARCHITECTURES[arch])
    return write_checkpoint(out_dir, shape, special, tensors, tokenizer, gguf_source(gguf_path))
