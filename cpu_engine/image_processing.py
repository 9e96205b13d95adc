"""CLIP image preprocessing (LLaVA-1.5's), reproducing transformers' `CLIPImageProcessorPil` exactly.

An image arrives as encoded bytes and leaves as float32 [3, H, W] pixel values: decode with Pillow, convert to
RGB (transparency composited onto white), resize the shortest edge with Pillow's filter, center-crop, rescale
(in float64, then rounded to float32, as transformers does) and normalize in float32. Every step follows the
reference's arithmetic, so the vision tower sees bit-identical inputs.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

# The saved type drops the backend suffix ("Pil"); published LLaVA-1.5 checkpoints name "CLIPImageProcessor".
SUPPORTED_PROCESSORS = ("CLIPImageProcessor", "CLIPImageProcessorPil")
# Switches that change the output and that this implementation does not perform.
_UNSUPPORTED_SWITCHES = ("do_pad", "do_flip_channel_order", "do_reduce_labels", "do_grayscale")


@dataclass(frozen=True)
class ImageProcessor:
    do_convert_rgb: bool
    do_resize: bool
    shortest_edge: int | None  # resize so the shorter side is this long, keeping the aspect ratio
    resize_to: tuple[int, int] | None  # or resize to exactly (height, width)
    resample: Image.Resampling
    do_center_crop: bool
    crop_size: tuple[int, int]  # (height, width)
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every output: fixed, since the vision tower takes one size."""
        if self.do_center_crop:
            return self.crop_size
        assert self.resize_to is not None  # from_dict refuses a size that depends on the image
        return self.resize_to

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path) -> ImageProcessor:
        """Read `preprocessor_config.json`, or the `image_processor` that transformers 5 nests in
        `processor_config.json`."""
        path = checkpoint_dir / "preprocessor_config.json"
        if path.is_file():
            return cls.from_dict(_read_json(path))
        nested_path = checkpoint_dir / "processor_config.json"
        nested = _read_json(nested_path).get("image_processor") if nested_path.is_file() else None
        if not isinstance(nested, dict):
            where = "no preprocessor_config.json (nor an image_processor section in processor_config.json)"
            raise ValueError(f"{checkpoint_dir}: {where}")
        return cls.from_dict(nested)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImageProcessor:
        kind = raw.get("image_processor_type") or raw.get("feature_extractor_type")
        if kind not in SUPPORTED_PROCESSORS:
            raise ValueError(f"image processor {kind!r} is not supported; supported: {', '.join(SUPPORTED_PROCESSORS)}")
        for switch in _UNSUPPORTED_SWITCHES:
            if raw.get(switch):
                raise ValueError(f"image processor option {switch} is not supported")
        do_resize = bool(raw.get("do_resize", True))
        shortest_edge, resize_to = _resize_target(raw.get("size", {"shortest_edge": 224}), raw)
        do_center_crop = bool(raw.get("do_center_crop", True))
        crop_size = _crop_size(raw.get("crop_size", {"height": 224, "width": 224}))
        if not do_center_crop and not (do_resize and resize_to is not None):
            raise ValueError(
                "the image processor's output size depends on the image (no center crop, no fixed resize): "
                "the vision tower needs one size"
            )
        resample = raw.get("resample", Image.Resampling.BICUBIC)
        if resample not in {int(r) for r in Image.Resampling}:
            raise ValueError(f"image processor resample {resample!r} is not a Pillow filter")
        return cls(
            do_convert_rgb=bool(raw.get("do_convert_rgb", True)),
            do_resize=do_resize,
            shortest_edge=shortest_edge,
            resize_to=resize_to,
            resample=Image.Resampling(resample),
            do_center_crop=do_center_crop,
            crop_size=crop_size,
            do_rescale=bool(raw.get("do_rescale", True)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            do_normalize=bool(raw.get("do_normalize", True)),
            image_mean=_per_channel(raw.get("image_mean", [0.48145466, 0.4578275, 0.40821073]), "image_mean"),
            image_std=_per_channel(raw.get("image_std", [0.26862954, 0.26130258, 0.27577711]), "image_std"),
        )

    def __call__(self, image: bytes) -> npt.NDArray[np.float32]:
        """Encoded image bytes (any format Pillow reads) to float32 [3, H, W] pixel values."""
        decoded = decode_image(image)
        if self.do_convert_rgb:
            decoded = _to_rgb(decoded)
        elif decoded.mode != "RGB":
            raise ValueError(f"the image is {decoded.mode}, not RGB, and the image processor does not convert it")
        if self.do_resize:
            height, width = self._resized_size(decoded.height, decoded.width)
            decoded = decoded.resize((width, height), resample=self.resample)
        pixels: npt.NDArray[Any] = np.asarray(decoded).transpose(2, 0, 1)  # HWC uint8 -> CHW
        if self.do_center_crop:
            pixels = _center_crop(pixels, self.crop_size)
        if self.do_rescale:
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        pixels = pixels.astype(np.float32, copy=False)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
            pixels = (pixels - mean) / std
        return np.ascontiguousarray(pixels, dtype=np.float32)

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize_to is not None:
            return self.resize_to
        assert self.shortest_edge is not None
        # transformers' rounding: the longer side is truncated, not rounded.
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)


def decode_image(data: bytes) -> Image.Image:
    """Decode with Pillow; undecodable data and decompression bombs are a ValueError."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; an image that large is refused all the same.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"the image cannot be decoded: {error}") from None
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _center_crop(pixels: npt.NDArray[Any], size: tuple[int, int]) -> npt.NDArray[Any]:
    """transformers' center crop: offsets round down; a side shorter than the crop is zero-padded, the padding
    split with the larger half before."""
    crop_height, crop_width = size
    height, width = pixels.shape[-2:]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[:, top : top + crop_height, left : left + crop_width]
    padded_height, padded_width = max(crop_height, height), max(crop_width, width)
    pad_top, pad_left = math.ceil((padded_height - height) / 2), math.ceil((padded_width - width) / 2)
    padded = np.zeros((pixels.shape[0], padded_height, padded_width), dtype=pixels.dtype)
    padded[:, pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[
        :, max(0, top) : min(padded_height, top + crop_height), max(0, left) : min(padded_width, left + crop_width)
    ]


def _resize_target(size: Any, raw: dict[str, Any]) -> tuple[int | None, tuple[int, int] | None]:
    if isinstance(size, int):  # the old form: CLIP reads a bare number as the shortest edge
        return (None, (size, size)) if raw.get("default_to_square", False) else (size, None)
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        return _positive(size["shortest_edge"], "size.shortest_edge"), None
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return None, (_positive(size["height"], "size.height"), _positive(size["width"], "size.width"))
    raise ValueError(f"image processor size {size!r} is not supported: shortest_edge, or height and width")


def _crop_size(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return _positive(size, "crop_size"), _positive(size, "crop_size")
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return _positive(size["height"], "crop_size.height"), _positive(size["width"], "crop_size.width")
    raise ValueError(f"image processor crop_size {size!r} is not supported: height and width")


def _positive(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"image processor {name} must be a positive integer, not {value!r}")
    return value


def _per_channel(value: Any, name: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, int | float) else value
    if not isinstance(values, list | tuple) or len(values) != 3 or not all(isinstance(v, int | float) for v in values):
        raise ValueError(f"image processor {name} must be one number or three, not {value!r}")
    return float(values[0]), float(values[1]), float(values[2])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read it ({error})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a JSON object")
    return raw
