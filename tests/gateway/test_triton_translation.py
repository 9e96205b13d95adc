"""Requests as Triton tensors: the adapter weights go in the engine's dtype (TensorRT-LLM refuses any other)."""

from __future__ import annotations

import numpy as np

from gateway.triton_translation import GenerationPlan, LoraRequest, bfloat16_bits, ensemble_request
from triton_models import tensors as t

WEIGHTS = np.array([[1.0, -2.0, 1 / 3], [65504.0, 1.00390625, 1.01171875]], dtype=np.float16)
CONFIG = np.array([[0, 0, 8]], dtype=np.int32)


def _plan(weights_dtype: str) -> GenerationPlan:
    lora = LoraRequest(7, lambda: (WEIGHTS, CONFIG), weights_dtype)
    return GenerationPlan(prompt="hi", prompt_tokens=1, max_tokens=4, temperature=0.0, top_k=None, top_p=None,
                          presence_penalty=0.0, frequency_penalty=0.0, stop_sequences=(), lora=lora)  # fmt: skip


def _weights_input(weights_dtype: str) -> tuple[str, list[int], bytes]:
    request = ensemble_request("ensemble", "r", _plan(weights_dtype), (WEIGHTS, CONFIG))
    index = next(i for i, tensor in enumerate(request.inputs) if tensor.name == t.LORA_WEIGHTS)
    tensor = request.inputs[index]
    return tensor.datatype, list(tensor.shape), request.raw_input_contents[index]


def test_float16_engines_get_float16_weights() -> None:
    datatype, shape, raw = _weights_input("float16")
    assert (datatype, shape) == ("FP16", [1, 2, 3])
    assert np.array_equal(np.frombuffer(raw, dtype=np.float16).reshape(2, 3), WEIGHTS)


def test_bfloat16_engines_get_bfloat16_weights_rounded_to_nearest_even() -> None:
    datatype, shape, raw = _weights_input("bfloat16")
    assert (datatype, shape) == ("BF16", [1, 2, 3])
    bits = np.frombuffer(raw, dtype=np.uint16).reshape(2, 3)
    # 1/3 rounds up (0x3EAB); 65504 rounds to 65536; 1 + 2^-8 is a tie and goes to even (1.0); 1 + 3*2^-8 up.
    assert [hex(b) for b in bits.ravel()] == ["0x3f80", "0xc000", "0x3eab", "0x4780", "0x3f80", "0x3f82"]
    assert bfloat16_bits(np.array([np.nan], dtype=np.float32))[0] == 0x7FC0


def _sampling_inputs(temperature: float, top_k: int | None, top_p: float | None) -> dict[str, bytes]:
    plan = GenerationPlan(prompt="hi", prompt_tokens=1, max_tokens=4, temperature=temperature, top_k=top_k,
                          top_p=top_p, presence_penalty=0.0, frequency_penalty=0.0, stop_sequences=())  # fmt: skip
    request = ensemble_request("ensemble", "r", plan)
    return {tensor.name: request.raw_input_contents[i] for i, tensor in enumerate(request.inputs)}


def test_sampling_reaches_tensorrt_llm_as_sampling() -> None:
    # TensorRT-LLM decodes greedily when neither top_k nor top_p is set, whatever the temperature.
    only_temperature = _sampling_inputs(0.7, None, None)
    assert np.frombuffer(only_temperature[t.TOP_P], dtype=np.float32)[0] == 1.0 and t.TOP_K not in only_temperature
    with_top_k = _sampling_inputs(0.7, 40, None)
    assert np.frombuffer(with_top_k[t.TOP_K], dtype=np.int32)[0] == 40 and t.TOP_P not in with_top_k
    assert np.frombuffer(_sampling_inputs(0.7, None, 0.9)[t.TOP_P], dtype=np.float32)[0] == np.float32(0.9)
    greedy = _sampling_inputs(0.0, None, None)  # temperature 0: the best token only
    assert np.frombuffer(greedy[t.TOP_K], dtype=np.int32)[0] == 1 and t.TOP_P not in greedy
    # Each sampled request draws with a seed of its own (TensorRT-LLM would use one default seed for all).
    seeds = {np.frombuffer(_sampling_inputs(0.7, None, None)[t.SEED], dtype=np.uint64)[0] for _ in range(5)}
    assert len(seeds) == 5 and t.SEED not in greedy
