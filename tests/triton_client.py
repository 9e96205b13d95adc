"""A small synchronous client for the ensemble over gRPC streaming (tritonclient), for tests and benchmarks."""

from __future__ import annotations

import queue
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from triton_models import tensors as t


def infer_input(name: str, value: Any) -> grpcclient.InferInput:
    array = np.asarray(value)
    if array.dtype.kind in "UO":
        array = np.array([[v.encode() if isinstance(v, str) else v for v in np.ravel(array)]], dtype=object)
    elif array.ndim == 0:
        array = array.reshape(1, 1)
    elif array.ndim == 1:
        array = array[None, :]
    item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    item.set_data_from_numpy(array)
    return item


def ensemble_inputs(prompt: str, max_tokens: int, stream: bool, **options: Any) -> list[grpcclient.InferInput]:
    inputs = [
        infer_input(t.TEXT_INPUT, np.array([prompt], dtype=object)),
        infer_input(t.MAX_TOKENS, np.int32(max_tokens)),
        infer_input(t.STREAM, np.bool_(stream)),
    ]
    kinds = {t.TOP_K: np.int32, t.MIN_TOKENS: np.int32, t.END_ID: np.int32, t.PAD_ID: np.int32, t.SEED: np.uint64}
    kinds[t.RETURN_LOG_PROBS] = np.bool_
    for name, value in options.items():
        if name in (t.STOP_WORDS, t.BAD_WORDS):
            inputs.append(infer_input(name, np.array(value, dtype=object)))
        else:
            inputs.append(infer_input(name, kinds.get(name, np.float32)(value)))
    return inputs


@dataclass
class Completion:
    pieces: list[bytes] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    @property
    def tokens(self) -> int:
        return sum(self.token_counts)


class StreamingClient:
    """One gRPC stream; many requests in flight on it, told apart by request id."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()

    def send(self, model: str, inputs: list[grpcclient.InferInput], request_id: str) -> None:
        self.client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)

    def collect(self, request_ids: set[str], timeout_s: float = 120.0) -> dict[str, Completion]:
        """Wait for the final response of every request id."""
        results = {rid: Completion() for rid in request_ids}
        pending = set(request_ids)
        while pending:
            result, error = self.responses.get(timeout=timeout_s)
            if error is not None:
                # tritonclient reports errors without the request id; with one request pending we know whose it is.
                if len(pending) != 1:
                    raise AssertionError(f"error with several requests pending: {error}")
                rid = next(iter(pending))
                results[rid].error = str(error)
                pending.discard(rid)
                continue
            response = result.get_response()
            completion = results[response.id]
            data = result.as_numpy(t.TEXT_BYTES_OUTPUT)
            if data is not None:
                completion.pieces.append(data.tobytes())
            count = result.as_numpy(t.OUTPUT_TOKEN_COUNT)
            if count is not None:
                completion.token_counts.append(int(count.reshape(-1)[0]))
            if response.parameters["triton_final_response"].bool_param:
                pending.discard(response.id)
        return results

    def complete(self, prompt: str, max_tokens: int, stream: bool, request_id: str = "r", **options: Any) -> Completion:
        self.send(t.ENSEMBLE, ensemble_inputs(prompt, max_tokens, stream, **options), request_id)
        return self.collect({request_id})[request_id]


def metric_value(metrics_url: str, name: str) -> float:
    """The value of a metric (summed over its label sets) from Triton's Prometheus endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        body = response.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name)]
    if not values:
        raise AssertionError(f"metric {name} not exported")
    return sum(values)


def wait_for_metric(metrics_url: str, name: str, value: float, timeout_s: float) -> None:
    """Poll until the metric equals value; fail if it does not within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (current := metric_value(metrics_url, name)) != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} is {current}, not {value}, after {timeout_s} s")
        time.sleep(0.05)
