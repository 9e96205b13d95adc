"""Deterministic random LoRA adapters made with `peft` (the reference), in the standard PEFT format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.hf_reference import load_hf_model, torch

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_random_adapter(
    checkpoint: Path, out_dir: Path, seed: int, rank: int = 8, alpha: float = 16.0,
    target_modules: list[str] | None = None, half_precision: bool = False,
) -> Path:  # fmt: skip
    """A LoRA adapter with random A and B (init_lora_weights=False, so it really changes the output).

    half_precision: values exactly representable in float16, as adapters saved in half precision are. The
    LoRA inputs of TensorRT-LLM (and so of the served path) carry float16; with such an adapter and a power
    of two for alpha / rank, the served weights are exactly the adapter's, and greedy tokens can be compared
    exactly with peft's."""
    import peft

    torch.manual_seed(seed)
    model = load_hf_model(checkpoint)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules or ALL_MODULES,
                             lora_dropout=0.0, init_lora_weights=False)  # fmt: skip
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():  # larger updates than the default init, so greedy tokens move
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.mul_(4.0)
                if half_precision:
                    parameter.copy_(parameter.half().float())
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def load_reference_with_adapter(checkpoint: Path, adapter_dir: Path) -> Any:
    import peft

    model = peft.PeftModel.from_pretrained(load_hf_model(checkpoint), str(adapter_dir))
    model.eval()
    return model
