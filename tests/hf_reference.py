"""Hugging Face `transformers` (torch, CPU) as the reference implementation the engine is checked against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def load_hf_model(checkpoint: Path, **kwargs: Any) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32, **kwargs)
    model.eval()
    return model


def hf_greedy(model: Any, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation with no end-of-sequence stop: exactly new_tokens tokens."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]
