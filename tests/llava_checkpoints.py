"""A deterministic tiny random LLaVA-1.5-style checkpoint made with transformers' own classes (the reference).

The language model is the project's tiny byte-level-BPE Llama (its weights copied, so its logits stay peaked and
greedy choices far from ties) with one added special token, `<image>`; the vision side is a tiny CLIP tower and
a two-layer projector whose random weights are large enough that the image visibly steers generation.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from safetensors.numpy import load_file
from tokenizers import AddedToken, Tokenizer

from build_engines.tiny_checkpoints import TokenizerStyle, write_tiny_checkpoint
from tests.hf_reference import torch, transformers

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 32
PATCH_SIZE = 8
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # the "default" strategy drops the CLS position
# CLIP's normalisation constants (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _text_config(tiny: dict[str, Any], vocab_size: int) -> Any:
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=tiny["hidden_size"],
        intermediate_size=tiny["intermediate_size"],
        num_hidden_layers=tiny["num_hidden_layers"],
        num_attention_heads=tiny["num_attention_heads"],
        num_key_value_heads=tiny["num_key_value_heads"],
        head_dim=tiny["head_dim"],
        max_position_embeddings=tiny["max_position_embeddings"],
        rms_norm_eps=tiny["rms_norm_eps"],
        rope_theta=tiny["rope_theta"],
        # Untied, as in real LLaVA-1.5: the <image> row of lm_head can then be zero (never the argmax in practice)
        # while its embedding row, which the image features replace, is arbitrary.
        tie_word_embeddings=False,
        bos_token_id=tiny["bos_token_id"],
        eos_token_id=tiny["eos_token_id"],
        pad_token_id=tiny["pad_token_id"],
    )


def _llava_config(tiny: dict[str, Any], image_token_id: int) -> Any:
    vision = transformers.CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="quick_gelu",
    )
    return transformers.LlavaConfig(
        vision_config=vision,
        text_config=_text_config(tiny, image_token_id + 1),
        image_token_index=image_token_id,
        image_seq_length=TOKENS_PER_IMAGE,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def _vision_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random vision-side weights, scaled so activations stay near unit size through every layer."""
    if "norm" in name and name.endswith(".weight"):  # layer_norm1/2, pre_layrnorm, post_layernorm
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if name.endswith(".bias"):
        return 0.1 * rng.standard_normal(shape)
    if name.endswith("class_embedding") or name.endswith("position_embedding.weight"):
        return rng.standard_normal(shape)
    fan_in = int(np.prod(shape[1:]))
    return rng.standard_normal(shape) / np.sqrt(fan_in)


def _set_weights(model: Any, tiny_tensors: dict[str, np.ndarray], seed: int) -> None:
    rng = np.random.default_rng(seed)
    state = model.state_dict()
    values: dict[str, np.ndarray] = {}
    for name, tensor in state.items():
        if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            values[name] = _vision_value(name, tuple(tensor.shape), rng)
    for name, array in tiny_tensors.items():
        values["model.language_model." + name.removeprefix("model.")] = array
    embed = tiny_tensors["model.embed_tokens.weight"]
    extra = rng.standard_normal((1, embed.shape[1]))
    values["model.language_model.embed_tokens.weight"] = np.concatenate([embed, extra])
    values["lm_head.weight"] = np.concatenate([embed, np.zeros((1, embed.shape[1]))])
    missing = set(state) - set(values)
    if missing:
        raise AssertionError(f"weights left at their random init: {sorted(missing)}")
    with torch.no_grad():
        for name, value in values.items():
            state[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def _add_image_token(out_dir: Path) -> int:
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    image_token_id = int(tokenizer.token_to_id(IMAGE_TOKEN))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["added_tokens_decoder"][str(image_token_id)] = {
        "content": IMAGE_TOKEN, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
        "single_word": False,
    }  # fmt: skip
    config["image_token"] = IMAGE_TOKEN
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return image_token_id


def _image_processor() -> Any:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=Image.Resampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def _write_processor(out_dir: Path) -> None:
    """The image processor in `preprocessor_config.json` and the rest in `processor_config.json`, as published
    LLaVA checkpoints have them (transformers 5 would nest the image processor inside `processor_config.json`);
    the tokenizer files stay the project's."""
    image_processor = _image_processor()
    image_processor.save_pretrained(str(out_dir))
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=transformers.AutoTokenizer.from_pretrained(str(out_dir)),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS position, which "default" then drops again
        image_token=IMAGE_TOKEN,
    )
    with tempfile.TemporaryDirectory() as staging:
        processor.save_pretrained(staging)
        config = json.loads((Path(staging) / "processor_config.json").read_text())
    del config["image_processor"]
    (out_dir / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_tiny_llava(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny LLaVA checkpoint into out_dir (created if needed) and return it."""
    with tempfile.TemporaryDirectory() as staging:
        tiny_dir = write_tiny_checkpoint(Path(staging), TokenizerStyle.BYTE_BPE, seed=seed)
        tiny_config = json.loads((tiny_dir / "config.json").read_text())
        tiny_tensors = load_file(str(tiny_dir / "model.safetensors"))
        generation_config = (tiny_dir / "generation_config.json").read_text()
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_dir / name, out_dir / name)
    image_token_id = _add_image_token(out_dir)
    torch.manual_seed(seed)  # the init the weights are then overwritten from; seeded anyway
    model = transformers.LlavaForConditionalGeneration(_llava_config(tiny_config, image_token_id))
    _set_weights(model, tiny_tensors, seed)
    model.save_pretrained(str(out_dir))
    # save_pretrained writes its own generation_config.json: keep the tiny model's (every end id).
    (out_dir / "generation_config.json").write_text(generation_config)
    _write_processor(out_dir)
    return out_dir


def reference_llava(checkpoint: Path) -> tuple[Any, Any]:
    """The transformers model (eval, float32) and processor of a LLaVA checkpoint."""
    model = transformers.LlavaForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.eval()
    processor = transformers.LlavaProcessor.from_pretrained(str(checkpoint))
    return model, processor


def hf_llava_greedy(model: Any, processor: Any, prompt: str, images: list[Image.Image], new_tokens: int) -> list[int]:
    """Greedy continuation of a prompt with one `<image>` per image, with no end-of-sequence stop."""
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return [int(t) for t in out[0, prompt_length:]]
