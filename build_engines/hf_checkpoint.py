"""Write a standard Hugging Face checkpoint directory.

Both the GGUF converter and the tiny test-checkpoint generator end here, so every checkpoint the project
makes has the same files: `config.json` (LlamaForCausalLM), `generation_config.json` (every end id),
`model.safetensors`, `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import save_file
from tokenizers import Tokenizer

CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    head_dim: int | None = None
    rope_scaling: dict[str, Any] | None = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass(frozen=True)
class SpecialTokens:
    bos: str | None
    eos: str
    unk: str | None
    pad: str | None
    end_ids: tuple[int, ...]  # every id that ends generation; the first is the primary eos
    bos_id: int | None
    pad_id: int | None
    add_bos: bool = False
    chat_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def config_json(shape: LlamaShape, special: SpecialTokens) -> dict[str, Any]:
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "rope_scaling": shape.rope_scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "bos_token_id": special.bos_id,
        "eos_token_id": special.end_ids[0],
        "pad_token_id": special.pad_id,
        "torch_dtype": "float32",
    }
    return config


def generation_config_json(special: SpecialTokens) -> dict[str, Any]:
    return {
        "bos_token_id": special.bos_id,
        "eos_token_id": list(special.end_ids),
        "pad_token_id": special.pad_id,
    }


def tokenizer_config_json(tokenizer: Tokenizer, special: SpecialTokens, model_max_length: int) -> dict[str, Any]:
    added = {
        str(token_id): {
            "content": token.content,
            "special": token.special,
            "lstrip": token.lstrip,
            "rstrip": token.rstrip,
            "normalized": token.normalized,
            "single_word": token.single_word,
        }
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special.bos,
        "eos_token": special.eos,
        "unk_token": special.unk,
        "pad_token": special.pad,
        "add_bos_token": special.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": added,
        **special.extra,
    }
    if special.chat_template:
        config["chat_template"] = special.chat_template
    return config


def write_checkpoint(
    out_dir: Path,
    shape: LlamaShape,
    special: SpecialTokens,
    tensors: dict[str, npt.NDArray[np.float32]],
    tokenizer: Tokenizer,
) -> Path:
    """Write all checkpoint files into out_dir (created if needed) and return it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config_json(shape, special), indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config_json(special), indent=2) + "\n")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = tokenizer_config_json(tokenizer, special, shape.max_position_embeddings)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    contiguous = {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in tensors.items()}
    save_file(contiguous, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
