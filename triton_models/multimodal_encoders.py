"""Triton Python model `multimodal_encoders`: a request's images → their features, one row per image token.

Each image is decoded and preprocessed exactly as the checkpoint's image processor does it
(cpu_engine/image_processing.py), then the vision tower and projector run on all of them together
(cpu_engine/vision.py). The rows come out in image order: the prompt table preprocessing hands on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cpu_engine.image_processing import ImageProcessor
from cpu_engine.vision import VisionEncoder
from triton_models import tensors as t
from triton_models.triton_io import error_response, output_dtype, pb_utils, tensor


def encode_images(processor: ImageProcessor, encoder: VisionEncoder, images: list[bytes]) -> npt.NDArray[np.float32]:
    """[images * tokens per image, hidden] float32; ValueError names the image that cannot be read."""
    pixels = []
    for index, data in enumerate(images):
        try:
            pixels.append(processor(data))
        except Exception as error:  # Pillow raises several kinds for damaged files
            raise ValueError(f"image {index} cannot be read: {error}") from None
    features = encoder.encode(np.stack(pixels))
    return np.ascontiguousarray(features.reshape(-1, features.shape[-1]), dtype=np.float32)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        parameters = json.loads(args["model_config"])["parameters"]
        checkpoint = Path(parameters["checkpoint_dir"]["string_value"])
        self.processor = ImageProcessor.from_checkpoint(checkpoint)
        self.encoder = VisionEncoder.from_checkpoint(checkpoint)
        self.dtype = output_dtype(args, t.ENCODER_OUT_TABLE)

    def execute(self, requests: list[Any]) -> list[Any]:
        utils = pb_utils()
        responses = []
        for request in requests:
            try:
                raw = utils.get_input_tensor_by_name(request, t.ENCODER_IMAGE_BYTES).as_numpy().reshape(-1)
                table = encode_images(self.processor, self.encoder, [bytes(item) for item in raw])
                output = tensor(t.ENCODER_OUT_TABLE, table.astype(self.dtype, copy=False))
                responses.append(utils.InferenceResponse(output_tensors=[output]))
            except ValueError as error:
                responses.append(error_response(str(error)))
        return responses
