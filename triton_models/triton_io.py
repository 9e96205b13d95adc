"""Reading request tensors and building responses in Triton's Python backend.

`triton_python_backend_utils` exists only inside Triton's Python backend stub, so it is imported
lazily; everything that can be tested without Triton lives elsewhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


def pb_utils() -> Any:
    import triton_python_backend_utils

    return triton_python_backend_utils


def optional_tensor(request: Any, name: str) -> npt.NDArray[Any] | None:
    tensor = pb_utils().get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def required_tensor(request: Any, name: str) -> npt.NDArray[Any]:
    value = optional_tensor(request, name)
    if value is None:
        raise ValueError(f"input '{name}' is required")
    return value


def scalar(request: Any, name: str, default: Any) -> Any:
    """The single value of an optional [batch, 1] input (batch must be 1), or default."""
    value = optional_tensor(request, name)
    if value is None or value.size == 0:
        return default
    if value.size != 1:
        raise ValueError(f"input '{name}' must hold one value per request, got shape {list(value.shape)}")
    return value.reshape(-1)[0].item()


def strings(request: Any, name: str) -> list[str]:
    """All strings of an optional BYTES input, UTF-8 decoded."""
    value = optional_tensor(request, name)
    if value is None:
        return []
    out = []
    for item in value.reshape(-1):
        raw = item if isinstance(item, bytes) else str(item).encode()
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"input '{name}' is not valid UTF-8") from error
    return out


def tensor(name: str, array: npt.NDArray[Any]) -> Any:
    return pb_utils().Tensor(name, np.ascontiguousarray(array))


def error_response(message: str) -> Any:
    utils = pb_utils()
    return utils.InferenceResponse(output_tensors=[], error=utils.TritonError(message))


def output_dtype(args: dict[str, Any], name: str) -> np.dtype[Any]:
    """The numpy dtype the model's config declares for an output (templates choose it per target)."""
    import json

    for output in json.loads(args["model_config"])["output"]:
        if output["name"] == name:
            return np.dtype(pb_utils().triton_string_to_numpy(output["data_type"]))
    raise ValueError(f"the model config declares no output {name!r}")
