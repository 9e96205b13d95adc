"""Where API requests become Triton tensors, and Triton responses become text chunks.

A validated completion request turns into one `ModelInferRequest` for the ensemble (NVIDIA's input
names); every `ModelStreamInfer` response turns into a `Chunk` of bytes. Non-streaming requests use the
same streaming call: the gateway assembles the chunks.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from tritonclient.grpc import service_pb2

from triton_models import tensors as t

LoraTensors = tuple[npt.NDArray[np.float16], npt.NDArray[np.int32]]  # (lora_weights, lora_config)


@dataclass(frozen=True)
class LoraRequest:
    """A custom model's adapter: its task id, and how to read its tensors for a server that lacks them."""

    task_id: int
    load_tensors: Callable[[], LoraTensors]
    weights_dtype: str = "float16"  # the engine's: "float16" or "bfloat16"
    model_id: str = ""  # the custom model's id, for errors


@dataclass(frozen=True)
class GenerationPlan:
    """Everything the ensemble needs for one completion, already validated and defaulted."""

    prompt: str
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    presence_penalty: float
    frequency_penalty: float
    stop_sequences: tuple[str, ...]
    lora: LoraRequest | None = None
    images: tuple[bytes, ...] = ()  # encoded image files, checked (gateway/images.py)


@dataclass(frozen=True)
class Chunk:
    data: bytes  # the exact bytes of this response's tokens (may end inside a UTF-8 character)
    tokens: int
    final: bool


def _bytes_tensor(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


class _RequestBuilder:
    def __init__(self, model: str, request_id: str) -> None:
        self.request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
        # Without it an end of stream with no tokens would not reach us as a final response.
        self.request.parameters["triton_enable_empty_final_response"].bool_param = True

    def add(self, name: str, value: int | float | bool, dtype: str) -> None:
        self.request.inputs.add(name=name, datatype=dtype, shape=[1, 1])
        numpy_type = {"INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "UINT64": np.uint64}[dtype]
        self.request.raw_input_contents.append(np.array([value], dtype=numpy_type).tobytes())

    def add_bytes(self, name: str, values: list[bytes]) -> None:
        self.request.inputs.add(name=name, datatype="BYTES", shape=[1, len(values)])
        self.request.raw_input_contents.append(_bytes_tensor(values))

    def add_int32_array(self, name: str, values: list[int]) -> None:
        self.add_array(name, np.array(values, dtype=np.int32), "INT32")

    def add_array(self, name: str, values: npt.NDArray[np.generic], dtype: str) -> None:
        """With the batch dimension (1) in front."""
        self.request.inputs.add(name=name, datatype=dtype, shape=[1, *values.shape])
        self.request.raw_input_contents.append(np.ascontiguousarray(values).tobytes())


def ensemble_request(
    ensemble: str, request_id: str, plan: GenerationPlan, lora_tensors: LoraTensors | None = None
) -> service_pb2.ModelInferRequest:
    """The ensemble request; a custom model's adapter goes as its task id, plus `lora_tensors` when given
    (the first request to a server, and again when the server no longer has it cached)."""
    builder = _RequestBuilder(ensemble, request_id)
    builder.add_bytes(t.TEXT_INPUT, [plan.prompt.encode("utf-8")])
    builder.add(t.MAX_TOKENS, plan.max_tokens, "INT32")
    builder.add(t.STREAM, True, "BOOL")
    if plan.temperature == 0.0:
        # Greedy, in the form TensorRT-LLM understands (it has no temperature 0): keep only the best token.
        builder.add(t.TOP_K, 1, "INT32")
        builder.add(t.TEMPERATURE, 1.0, "FP32")
    else:
        builder.add(t.TEMPERATURE, plan.temperature, "FP32")
        if plan.top_k is not None:
            builder.add(t.TOP_K, plan.top_k, "INT32")
        # A seed of its own per request: TensorRT-LLM gives requests without random_seed its default seed, and
        # identical sampled requests would then draw identical completions.
        builder.add(t.SEED, secrets.randbits(63), "UINT64")
    if plan.top_p is not None:
        builder.add(t.TOP_P, plan.top_p, "FP32")
    elif plan.temperature != 0.0 and plan.top_k is None:
        # With neither top_k nor top_p, TensorRT-LLM decodes greedily whatever the temperature: top_p 1.0 asks
        # for sampling from the whole distribution, as the API means.
        builder.add(t.TOP_P, 1.0, "FP32")
    if plan.presence_penalty:
        builder.add(t.PRESENCE_PENALTY, plan.presence_penalty, "FP32")
    if plan.frequency_penalty:
        builder.add(t.FREQUENCY_PENALTY, plan.frequency_penalty, "FP32")
    if plan.stop_sequences:
        # The engine stops by itself where a stop word tokenizes cleanly; the gateway enforces it on text anyway.
        builder.add_bytes(t.STOP_WORDS, [s.encode("utf-8") for s in plan.stop_sequences])
    if plan.images:
        builder.add_bytes(t.IMAGE_BYTES_INPUT, list(plan.images))
    if plan.lora is not None:
        builder.add(t.LORA_TASK_ID, plan.lora.task_id, "UINT64")
        if lora_tensors is not None:
            weights, config = lora_tensors
            if plan.lora.weights_dtype == "bfloat16":
                builder.add_array(t.LORA_WEIGHTS, bfloat16_bits(weights), "BF16")
            else:
                builder.add_array(t.LORA_WEIGHTS, weights.astype(np.float16, copy=False), "FP16")
            builder.add_array(t.LORA_CONFIG, config.astype(np.int32, copy=False), "INT32")
    return builder.request


def bfloat16_bits(values: npt.ArrayLike) -> npt.NDArray[np.uint16]:
    """bfloat16 as Triton's BF16 tensors hold it (numpy has no such type): the upper half of each float32,
    rounded to nearest, ties to even (NaN stays NaN)."""
    floats = np.ascontiguousarray(values, dtype=np.float32)
    bits = floats.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    return np.where(np.isnan(floats), np.uint16(0x7FC0), rounded.astype(np.uint16))


def stop_request(generation_model: str, request_id: str) -> service_pb2.ModelInferRequest:
    """TensorRT-LLM's way to end a running request: the same request id with `stop` set (dummy prompt)."""
    builder = _RequestBuilder(generation_model, request_id)
    builder.add_int32_array(t.INPUT_IDS, [0])
    builder.add(t.INPUT_LENGTHS, 1, "INT32")
    builder.add(t.REQUEST_OUTPUT_LEN, 1, "INT32")
    builder.add(t.STOP, True, "BOOL")
    return builder.request


def read_chunk(response: service_pb2.ModelInferResponse) -> Chunk:
    """The response's exact bytes: text_output_bytes, or, from a repository rendered before that output existed
    (not re-rendered since), text_output, which carried the exact bytes then."""
    data: bytes | None = None
    legacy = b""
    tokens = 0
    for index, output in enumerate(response.outputs):
        if index >= len(response.raw_output_contents):
            break
        raw = response.raw_output_contents[index]
        if output.name == t.TEXT_BYTES_OUTPUT:
            data = raw  # uint8: the bytes themselves
        elif output.name == t.TEXT_OUTPUT:
            legacy = _first_bytes_element(raw)
        elif output.name == t.OUTPUT_TOKEN_COUNT:
            tokens = sum(struct.unpack(f"<{len(raw) // 4}i", raw))
    final = response.parameters["triton_final_response"].bool_param
    return Chunk(data=legacy if data is None else data, tokens=tokens, final=final)


def _first_bytes_element(raw: bytes) -> bytes:
    if len(raw) < 4:
        return b""
    (length,) = struct.unpack_from("<I", raw, 0)
    return raw[4 : 4 + length]
