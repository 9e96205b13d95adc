"""Triton Python model `multimodal_encoders`: a request's images → their features, one row per image token.

Each image is decoded and preprocessed exactly as the checkpoint's image processor does it
(cpu_engine/image_processing.py), then the vision tower and projector run on all of them together: in numpy
(cpu_engine/vision.py), or, when the repository names a `visual_engine_dir` (GPU builds), in the TensorRT
engine that TensorRT-LLM's `build_visual_engine.py` made of the same tower and projector (input `input`,
float16 pixels; output `output`, the features). The rows come out in image order: the prompt table
preprocessing hands on.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from cpu_engine.image_processing import ImageProcessor
from cpu_engine.vision import VisionEncoder
from triton_models import tensors as t
from triton_models.triton_io import error_response, output_dtype, pb_utils, tensor

VISUAL_ENGINE_FILE = "model.engine"  # what build_visual_engine.py writes into its output directory


class ImageEncoder(Protocol):
    def encode(self, pixel_values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...


class TensorRTVisionEngine:
    """The vision tower + projector as a TensorRT engine, run with TensorRT-LLM's Session (NGC container, GPU)."""

    def __init__(self, engine_dir: Path) -> None:
        try:
            self._trt = importlib.import_module("tensorrt")
            self._torch = importlib.import_module("torch")
            runtime = importlib.import_module("tensorrt_llm.runtime")
            self._to_torch = importlib.import_module("tensorrt_llm._utils").trt_dtype_to_torch
        except ImportError as error:
            raise RuntimeError(
                f"visual_engine_dir is set ({engine_dir}) but TensorRT-LLM is not importable here ({error}): "
                "serve GPU builds in the NGC image they were built with"
            ) from None
        engine = engine_dir / VISUAL_ENGINE_FILE
        if not engine.is_file():
            raise RuntimeError(f"{engine}: no vision engine (did the build's vision step run?)")
        self._tensor_info = runtime.TensorInfo
        self.session = runtime.Session.from_serialized_engine(engine.read_bytes())
        self.stream = self._torch.cuda.Stream()

    def encode(self, pixel_values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        torch = self._torch
        image = torch.from_numpy(pixel_values).to("cuda", torch.float16)
        shapes = self.session.infer_shapes([self._tensor_info("input", self._trt.DataType.HALF, tuple(image.shape))])
        outputs = {
            info.name: torch.empty(tuple(info.shape), dtype=self._to_torch(info.dtype), device="cuda")
            for info in shapes
        }
        if not self.session.run({"input": image}, outputs, self.stream.cuda_stream):
            raise RuntimeError("the vision engine failed to run")
        self.stream.synchronize()
        return np.asarray(outputs["output"].float().cpu().numpy(), dtype=np.float32)


def image_encoder(checkpoint: Path, visual_engine_dir: str) -> ImageEncoder:
    """The GPU engine when the repository names one, else the numpy tower and projector."""
    if visual_engine_dir:
        return TensorRTVisionEngine(Path(visual_engine_dir))
    return VisionEncoder.from_checkpoint(checkpoint)


def encode_images(processor: ImageProcessor, encoder: ImageEncoder, images: list[bytes]) -> npt.NDArray[np.float32]:
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
        self.encoder = image_encoder(checkpoint, parameters.get("visual_engine_dir", {}).get("string_value", ""))
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
