"""Triton Python model `echo_llm`: tensorrt_llm's tensor interface, no model behind it.

It streams `request_output_len` tokens at once, cycling through the prompt's own ids, so a benchmark on
it measures only what surrounds generation: the ensemble, pre/postprocessing, gRPC and the gateway.
"""

from __future__ import annotations

from typing import Any

from triton_models import tensors as t
from triton_models.generation import generation_response
from triton_models.triton_io import error_response, pb_utils, required_tensor, scalar


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> None:
        final = pb_utils().TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            try:
                if bool(scalar(request, t.STOP, False)):
                    sender.send(flags=final)
                    continue
                prompt = [int(i) for i in required_tensor(request, t.INPUT_IDS).reshape(-1)]
                count = int(scalar(request, t.REQUEST_OUTPUT_LEN, 1))
                # As the generation model does: nothing to echo must be an error, never a stream without an end.
                if not prompt:
                    raise ValueError(f"input '{t.INPUT_IDS}' is empty")
                if count < 1:
                    raise ValueError(f"{t.REQUEST_OUTPUT_LEN} must be >= 1, got {count}")
                tokens = [prompt[i % len(prompt)] for i in range(count)]
                if bool(scalar(request, t.STREAMING, False)):
                    for index, token in enumerate(tokens):
                        sender.send(generation_response([token], [0.0], 0.0), flags=final if index == count - 1 else 0)
                else:
                    sender.send(generation_response(tokens, [0.0] * len(tokens), 0.0), flags=final)
            except ValueError as error:
                sender.send(error_response(str(error)), flags=final)
        return None
