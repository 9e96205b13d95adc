"""A checkpoint's end-of-sequence and padding ids, as the ensemble uses them.

TensorRT-LLM takes one end id per request: the first of the checkpoint's. The others (Llama 3 Instruct ends
its turns with <|eot_id|>, its documents with <|end_of_text|>) travel as single-token stop words, which
preprocessing adds when the client names no end id; a stop word stays in TensorRT-LLM's output, so
postprocessing leaves such an end token out, as the end id itself never appears there: an answer reads and
counts the same whichever end id ended it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SpecialIds:
    end_ids: tuple[int, ...]  # never empty
    pad_id: int

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path) -> SpecialIds:
        """generation_config.json's ids, else config.json's; eos_token_id may be one id or a list."""
        generation = _read_json(checkpoint_dir / "generation_config.json")
        config = _read_json(checkpoint_dir / "config.json")
        eos = generation.get("eos_token_id", config.get("eos_token_id"))
        end_ids = (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos or [])
        if not end_ids:
            raise ValueError(f"{checkpoint_dir}: no eos_token_id in generation_config.json or config.json")
        pad = generation.get("pad_token_id", config.get("pad_token_id"))
        return cls(end_ids, int(pad) if pad is not None else end_ids[0])

    @property
    def stop_word_end_ids(self) -> tuple[int, ...]:
        """The end ids besides the one TensorRT-LLM is given: they end generation as stop words."""
        return tuple(e for e in dict.fromkeys(self.end_ids[1:]) if e != self.end_ids[0])


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
