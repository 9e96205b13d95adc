"""Write a standard Hugging Face checkpoint directory.

Both the GGUF converter and the tiny test-checkpoint generator end here, so every checkpoint the project
makes has the same files: `config.json` (LlamaForCausalLM), `generation_config.json` (every end id),
`model.safetensors`, `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from cpu_engine.errors import CheckpointError

CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
# What a checkpoint was made from (e.g. the GGUF file's name and size): caches compare it to decide whether to
# convert again. Written with the other files, so it never describes weights it was not written with.
SOURCE_FILE = ".converted-from"


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


def check_output_dir(out_dir: Path) -> None:
    """out_dir must be new, empty, or a checkpoint this project wrote (which is then replaced as a whole):
    mixing new files with someone else's would make a checkpoint nobody wrote (the weights reader loads
    every .safetensors file in a directory)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir():
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in (*CHECKPOINT_FILES, SOURCE_FILE))
        if others:
            shown = ", ".join(others[:5]) + (", …" if len(others) > 5 else "")
            raise CheckpointError(
                f"{out_dir} holds files that are not a checkpoint written here ({shown}): give a new or empty directory"
            )


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished staging directory to out_dir, replacing a previous checkpoint there."""
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is read by the serving user too
    for path in staging.iterdir():
        path.chmod(0o666 & ~umask)  # safetensors writes through a private temporary file
    check_output_dir(out_dir)
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    out_dir.rename(retired / out_dir.name)
    staging.rename(out_dir)
    shutil.rmtree(retired, ignore_errors=True)


def write_checkpoint(
    out_dir: Path,
    shape: LlamaShape,
    special: SpecialTokens,
    tensors: dict[str, npt.NDArray[np.float32]],
    tokenizer: Tokenizer,
    source: str,
) -> Path:
    """Write all checkpoint files to out_dir and return it; `source` says what the checkpoint was made from.

    All or nothing: the files are written to a staging directory beside out_dir and moved into place when
    complete, so a failure (a full disk, Ctrl-C) leaves out_dir as it was, never half old and half new.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-", dir=out_dir.parent))
    try:
        (staging / "config.json").write_text(json.dumps(config_json(shape, special), indent=2) + "\n")
        (staging / "generation_config.json").write_text(json.dumps(generation_config_json(special), indent=2) + "\n")
        tokenizer.save(str(staging / "tokenizer.json"))
        tokenizer_config = tokenizer_config_json(tokenizer, special, shape.max_position_embeddings)
        (staging / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n"
        )
        contiguous = {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in tensors.items()}
        save_file(contiguous, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / SOURCE_FILE).write_text(source + "\n")
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def checkpoint_source(checkpoint_dir: Path) -> str | None:
    """What the checkpoint in checkpoint_dir was made from, as write_checkpoint recorded it."""
    path = checkpoint_dir / SOURCE_FILE
    return path.read_text().strip() if path.is_file() else None
