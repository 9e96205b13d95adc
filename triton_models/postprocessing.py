"""Triton Python model `postprocessing`: each response's new token ids → their exact bytes, its text, and counts.

Stateless on purpose (each response is handled on its own, whatever else is in the batch): each token maps
to the bytes it adds to the text (see token_bytes.py), so the pieces of a stream concatenate to exactly the
text of the same request without streaming. Consumers of the bytes decode them incrementally; the text output
is those bytes decoded on their own (valid UTF-8, for Triton's generate endpoints and NVIDIA-style clients).

A checkpoint's other end ids end generation as stop words (special_ids.py), which TensorRT-LLM keeps in its output:
such a token ending a response is left out (its bytes and its count), as the end id itself is. Whether the
client named an end id of its own cannot reach this model (Triton 2.51 refuses an ensemble step fed by both
a decoupled model and the ensemble's inputs), so a client that turned end ids off (end_id -1, straight to
Triton; the gateway never does) does not get those tokens counted either; their bytes are empty anyway.

A repository rendered before OUTPUT_BYTES existed declares no such output: there OUTPUT keeps carrying the
exact bytes, as it did then, so upgrading the image without re-rendering the repository changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from triton_models import tensors as t
from triton_models.special_ids import SpecialIds
from triton_models.token_bytes import TokenBytes
from triton_models.triton_io import error_response, optional_tensor, pb_utils, required_tensor, tensor


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        checkpoint = Path(config["parameters"]["checkpoint_dir"]["string_value"])
        self.token_bytes = TokenBytes.from_file(checkpoint / "tokenizer.json")
        self.bytes_output = any(output["name"] == t.POST_OUTPUT_BYTES for output in config["output"])
        self.stop_word_end_ids = frozenset(SpecialIds.from_checkpoint(checkpoint).stop_word_end_ids)

    def execute(self, requests: list[Any]) -> list[Any]:
        utils = pb_utils()
        responses = []
        for request in requests:
            try:
                tokens = required_tensor(request, t.POST_TOKENS_BATCH)  # [batch, beam, tokens]
                lengths = optional_tensor(request, t.POST_SEQUENCE_LENGTH)  # [batch, beam]
                ids = tokens[(0,) * (tokens.ndim - 1)]  # first request of the batch, first beam
                if lengths is not None and lengths.size:
                    ids = ids[: int(lengths.reshape(-1)[0])]
                if ids.size and int(ids[-1]) in self.stop_word_end_ids:
                    ids = ids[:-1]
                data = self.token_bytes.join([int(i) for i in ids])
                outputs = [tensor(t.POST_OUTPUT_TOKEN_COUNT, np.array([[len(ids)]], dtype=np.int32))]
                if self.bytes_output:
                    # Decoded on its own for clients that need valid text; a character split across responses
                    # becomes U+FFFD there, never in the exact bytes beside it.
                    text = data.decode("utf-8", errors="replace").encode("utf-8")
                    outputs.append(tensor(t.POST_OUTPUT_BYTES, np.frombuffer(data, dtype=np.uint8).reshape(1, -1)))
                else:
                    text = data
                outputs.append(tensor(t.POST_OUTPUT, np.array([[text]], dtype=object)))
                for source, target in (
                    (t.POST_CUM_LOG_PROBS, t.POST_OUT_CUM_LOG_PROBS),
                    (t.POST_OUTPUT_LOG_PROBS, t.POST_OUT_OUTPUT_LOG_PROBS),
                ):
                    value = optional_tensor(request, source)
                    if value is not None:
                        outputs.append(tensor(target, value.astype(np.float32)))
                responses.append(utils.InferenceResponse(output_tensors=outputs))
            except ValueError as error:
                responses.append(error_response(str(error)))
        return responses
