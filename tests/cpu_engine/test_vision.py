"""The LLaVA vision side in numpy: CLIP preprocessing equals transformers' pixel values, the vision tower and
projector equal `get_image_features`, on a tiny random LLaVA checkpoint; unsupported configs are refused."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from build_engines.tiny_checkpoints import TokenizerStyle, write_tiny_checkpoint
from cpu_engine import CheckpointError
from cpu_engine.image_processing import ImageProcessor
from cpu_engine.vision import VisionConfig, VisionEncoder
from tests.hf_reference import hf_greedy, load_hf_model, torch
from tests.llava_checkpoints import TOKENS_PER_IMAGE, hf_llava_greedy, reference_llava, write_tiny_llava

pytestmark = pytest.mark.transformers

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


@pytest.fixture(scope="module")
def llava_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture(scope="module")
def reference(llava_checkpoint: Path) -> tuple[Any, Any]:
    return reference_llava(llava_checkpoint)


def _image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Noise over a gradient: resampling filters and JPEG both have something to work on.
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1.0, height)[:, None, None]
    pixels = np.clip(ramp + rng.normal(0, 40, (height, width, 4)), 0, 255).astype(np.uint8)
    if mode == "RGBA":
        return Image.fromarray(pixels, "RGBA")
    image = Image.fromarray(pixels[..., :3], "RGB")
    if mode == "P":  # a palette image with a transparent index: composited onto white like RGBA
        image = image.quantize(16)
        image.info["transparency"] = 3
        return image
    return image.convert(mode)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"transparency": image.info["transparency"]} if "transparency" in image.info else {}))
    return buffer.getvalue()


IMAGES = [
    pytest.param(size, "RGB", fmt, id=f"{size[0]}x{size[1]}-{fmt}")
    for size in [(40, 30), (30, 50), (64, 64), (20, 12), (33, 101)]
    for fmt in ("PNG", "JPEG")
] + [
    pytest.param((40, 30), "RGBA", "PNG", id="rgba-png"),
    pytest.param((30, 40), "L", "JPEG", id="grayscale-jpeg"),
    pytest.param((45, 30), "P", "PNG", id="palette-transparency-png"),
]


def _reference_pixels(image_processor: Any, data: bytes) -> np.ndarray:
    return np.asarray(image_processor(Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0])


@pytest.mark.parametrize(("size", "mode", "fmt"), IMAGES)
def test_pixel_values_equal_transformers(
    llava_checkpoint: Path, reference: tuple[Any, Any], size: tuple[int, int], mode: str, fmt: str
) -> None:
    data = _encoded(_image(*size, mode=mode), fmt)
    processor = ImageProcessor.from_checkpoint(llava_checkpoint)
    pixels = processor(data)
    expected = _reference_pixels(reference[1].image_processor, data)
    assert pixels.dtype == np.float32
    assert pixels.shape == expected.shape == (3, *processor.output_size) == (3, 32, 32)
    assert np.abs(pixels - expected).max() <= 1e-6


@pytest.mark.parametrize(
    "options",
    [
        {"size": {"height": 24, "width": 40}, "do_center_crop": False, "resample": 2},
        {"do_resize": False, "crop_size": {"height": 32, "width": 32}},  # smaller images are zero-padded
        {"size": 28, "crop_size": 24, "resample": 1, "image_mean": 0.5, "image_std": 0.25},  # the old int forms
        {"do_normalize": False, "rescale_factor": 0.5, "resample": 0},
    ],
    ids=["exact-size-bilinear", "crop-only", "int-sizes-lanczos", "rescale-only-nearest"],
)
def test_other_preprocessing_options_equal_transformers(options: dict[str, Any]) -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    reference_processor = CLIPImageProcessorPil(**options)
    # The options as written (transformers would save the int sizes as dicts); the rest are both sides' defaults.
    processor = ImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor", **options})
    for size in [(40, 30), (30, 50), (20, 12)]:
        data = _encoded(_image(*size, seed=1), "PNG")
        expected = _reference_pixels(reference_processor, data)
        assert processor(data).shape == expected.shape == (3, *processor.output_size)
        assert np.abs(processor(data) - expected).max() <= 1e-6


def test_the_image_processor_nested_in_processor_config_is_read(llava_checkpoint: Path, tmp_path: Path) -> None:
    nested = json.loads((llava_checkpoint / "processor_config.json").read_text())
    nested["image_processor"] = json.loads((llava_checkpoint / "preprocessor_config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps(nested))
    assert ImageProcessor.from_checkpoint(tmp_path) == ImageProcessor.from_checkpoint(llava_checkpoint)


def _reference_features(model: Any, pixel_values: np.ndarray, **kwargs: Any) -> np.ndarray:
    with torch.no_grad():
        output = model.get_image_features(pixel_values=torch.from_numpy(pixel_values), **kwargs)
    return torch.stack(list(output.pooler_output)).numpy()


@pytest.mark.parametrize("count", [1, 2])
def test_image_features_equal_transformers(llava_checkpoint: Path, reference: tuple[Any, Any], count: int) -> None:
    model, processor = reference
    images = [_image(40 + 10 * i, 30, seed=i) for i in range(count)]
    pixel_values = processor.image_processor(images, return_tensors="np")["pixel_values"]
    encoder = VisionEncoder.from_checkpoint(llava_checkpoint)
    features = encoder.encode(pixel_values)
    expected = _reference_features(model, pixel_values)
    assert features.dtype == np.float32
    assert features.shape == expected.shape == (count, encoder.config.tokens_per_image, 64)
    assert encoder.config.tokens_per_image == TOKENS_PER_IMAGE
    assert np.abs(features - expected).max() <= 1e-4
    # From encoded bytes through both numpy stages: the same features.
    image_processor = ImageProcessor.from_checkpoint(llava_checkpoint)
    from_bytes = encoder.encode(np.stack([image_processor(_encoded(image, "PNG")) for image in images]))
    assert np.abs(from_bytes - expected).max() <= 1e-4


@pytest.mark.parametrize(("strategy", "layer"), [("full", -2), ("default", 0), ("default", -1), ("full", 2)])
def test_other_feature_selections_equal_transformers(
    llava_checkpoint: Path, tmp_path: Path, strategy: str, layer: int
) -> None:
    checkpoint = shutil.copytree(llava_checkpoint, tmp_path / "variant")
    config = json.loads((checkpoint / "config.json").read_text())
    config |= {"vision_feature_select_strategy": strategy, "vision_feature_layer": layer}
    (checkpoint / "config.json").write_text(json.dumps(config))
    model, _ = reference_llava(checkpoint)
    pixel_values = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    encoder = VisionEncoder.from_checkpoint(checkpoint)
    features = encoder.encode(pixel_values)
    assert features.shape == (2, 16 + (strategy == "full"), 64) == (2, encoder.config.tokens_per_image, 64)
    # transformers 5.24 asks the tower for hidden states `output_hidden_states=vision_feature_layer`: layer 0
    # reads as "none" and its own lookup then fails, so ask for all of them.
    expected = _reference_features(model, pixel_values, output_hidden_states=True)
    assert np.abs(features - expected).max() <= 1e-4


@pytest.mark.parametrize(
    "prefix", ["model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower."]
)
def test_other_tensor_names_load_the_same_weights(llava_checkpoint: Path, tmp_path: Path, prefix: str) -> None:
    def rename(name: str) -> str:
        if name.startswith("vision_tower."):
            return prefix + name.removeprefix("vision_tower.")
        return "model." + name if prefix.startswith("model.") and name.startswith("multi_modal_projector.") else name

    renamed = {rename(k): v for k, v in load_file(str(llava_checkpoint / "model.safetensors")).items()}
    checkpoint = tmp_path / "renamed"
    checkpoint.mkdir()
    shutil.copy(llava_checkpoint / "config.json", checkpoint / "config.json")
    save_file(renamed, str(checkpoint / "model.safetensors"))
    pixel_values = np.random.default_rng(6).standard_normal((1, 3, 32, 32)).astype(np.float32)
    expected = VisionEncoder.from_checkpoint(llava_checkpoint).encode(pixel_values)
    assert np.array_equal(VisionEncoder.from_checkpoint(checkpoint).encode(pixel_values), expected)


def test_sharded_checkpoints_read_only_the_shards_with_vision_tensors(llava_checkpoint: Path, tmp_path: Path) -> None:
    tensors = load_file(str(llava_checkpoint / "model.safetensors"))
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for name, array in tensors.items():
        shards[f"model-0000{1 if name.startswith('language_model.') else 2}-of-00002.safetensors"][name] = array
    for file, part in shards.items():
        save_file(part, str(tmp_path / file))
    weight_map = {name: file for file, part in shards.items() for name in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(llava_checkpoint / "config.json", tmp_path / "config.json")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"damaged")  # never opened: no vision tensors
    pixel_values = np.random.default_rng(7).standard_normal((1, 3, 32, 32)).astype(np.float32)
    expected = VisionEncoder.from_checkpoint(llava_checkpoint).encode(pixel_values)
    assert np.array_equal(VisionEncoder.from_checkpoint(tmp_path).encode(pixel_values), expected)


def test_the_processor_expands_each_image_token(reference: tuple[Any, Any]) -> None:
    _, processor = reference
    ids = processor(images=[_image(40, 30)], text=PROMPT)["input_ids"][0]
    text_ids = processor.tokenizer(PROMPT)["input_ids"]
    start = text_ids.index(512)  # <image>, one special token in the text
    assert text_ids.count(512) == 1
    assert ids == text_ids[:start] + [512] * TOKENS_PER_IMAGE + text_ids[start + 1 :]


def test_images_steer_the_language_model(llava_checkpoint: Path, reference: tuple[Any, Any], tmp_path: Path) -> None:
    model, processor = reference
    images = [_image(40, 30, seed=s) for s in range(3)] + [Image.new("RGB", (32, 32), (255, 0, 0))]
    outputs = [hf_llava_greedy(model, processor, PROMPT, [image], 12) for image in images]
    assert len({tuple(o) for o in outputs}) == len(outputs)
    assert all(len(o) == 12 and 512 not in o for o in outputs)
    # Without images it is the tiny Llama it was made from.
    tiny = write_tiny_checkpoint(tmp_path / "tiny", TokenizerStyle.BYTE_BPE)
    text = "USER: What is in the picture? ASSISTANT:"
    assert hf_llava_greedy(model, processor, text, [], 12) == hf_greedy(
        load_hf_model(tiny), processor.tokenizer(text)["input_ids"], 12
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_processor_type": "SiglipImageProcessor"}, "image processor 'SiglipImageProcessor' is not supported"),
        ({"size": {"shortest_edge": 32, "longest_edge": 64}}, "size .* is not supported"),
        ({"crop_size": {"shortest_edge": 32}}, "crop_size .* is not supported"),
        ({"do_pad": True}, "do_pad is not supported"),
        ({"do_center_crop": False}, "output size depends on the image"),
        ({"resample": 9}, "resample 9 is not a Pillow filter"),
        ({"image_mean": [0.5, 0.5]}, "image_mean must be one number or three"),
    ],
)
def test_unsupported_preprocessor_configs_are_refused(
    llava_checkpoint: Path, change: dict[str, Any], message: str
) -> None:
    raw = json.loads((llava_checkpoint / "preprocessor_config.json").read_text()) | change
    with pytest.raises(ValueError, match=message):
        ImageProcessor.from_dict(raw)


def test_missing_preprocessor_config_and_bad_images_are_refused(llava_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no preprocessor_config\.json"):
        ImageProcessor.from_checkpoint(tmp_path)
    processor = ImageProcessor.from_checkpoint(llava_checkpoint)
    for data in (b"", b"not an image", _encoded(_image(40, 30), "PNG")[:60]):
        with pytest.raises(ValueError, match="the image cannot be decoded"):
            processor(data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vision_feature_layer": [-2, -1]}, "a list vision_feature_layer .* is not supported"),
        ({"vision_feature_layer": 3}, "vision_feature_layer 3 is outside the tower's 3 hidden states"),
        ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy 'cls' is not supported"),
        ({"projector_hidden_act": "relu"}, "projector_hidden_act 'relu' is not supported"),
        (
            {"vision_config": {"model_type": "siglip_vision_model"}},
            "vision tower 'siglip_vision_model' is not supported",
        ),
        ({"vision_config": {"hidden_act": "gelu_new"}}, "vision_config.hidden_act 'gelu_new' is not supported"),
        ({"vision_config": {"image_size": 30}}, "image_size 30 is not a multiple of patch_size 8"),
        ({"model_type": "llava_next"}, "model type 'llava_next' is not supported"),
    ],
)
def test_unsupported_vision_configs_are_refused(llava_checkpoint: Path, change: dict[str, Any], message: str) -> None:
    raw = json.loads((llava_checkpoint / "config.json").read_text())
    for key, value in change.items():
        raw[key] = raw[key] | value if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=message):
        VisionConfig.from_dict(raw)


def test_missing_tensors_and_wrong_pixel_shapes_are_refused(llava_checkpoint: Path, tmp_path: Path) -> None:
    tensors = load_file(str(llava_checkpoint / "model.safetensors"))
    del tensors["vision_tower.encoder.layers.0.mlp.fc1.bias"]
    shutil.copy(llava_checkpoint / "config.json", tmp_path / "config.json")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"vision tensors missing: vision_tower\.encoder\.layers\.0\.mlp\.fc1\.bias"
    ):
        VisionEncoder.from_checkpoint(tmp_path)
    encoder = VisionEncoder.from_checkpoint(llava_checkpoint)
    with pytest.raises(ValueError, match=r"the vision tower takes \[n, 3, 32, 32\]"):
        encoder.encode(np.zeros((1, 3, 24, 24), dtype=np.float32))
