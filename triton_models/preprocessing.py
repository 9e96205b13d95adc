"""Triton Python model `preprocessing`: prompt text → token ids, stop/bad words → id lists, end/pad ids; and for
vision-language checkpoints, images → the prompt table (through `multimodal_encoders`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from cpu_engine import ModelConfig
from triton_models import tensors as t
from triton_models.image_prompt import ImageSlots, expand_placeholders, place_images
from triton_models.special_ids import SpecialIds
from triton_models.triton_io import error_response, optional_tensor, output_dtype, pb_utils, scalar, strings, tensor
from triton_models.word_lists import pack_word_lists

# Images → [rows, hidden] features (the multimodal_encoders model, called by BLS).
ImageEncoder = Callable[[list[bytes]], npt.NDArray[np.float32]]


class TokenizerFacts:
    """The tokenizer and the special ids the generation model needs, read once from the checkpoint."""

    def __init__(self, checkpoint_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
        self.special_ids = SpecialIds.from_checkpoint(checkpoint_dir)
        model = ModelConfig.from_checkpoint(checkpoint_dir)
        self.vocab_size = model.vocab_size  # the first prompt-table id
        self.images = ImageSlots.from_checkpoint(checkpoint_dir, self.tokenizer) if model.accepts_images else None

    def encode_prompt(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def encode_words(self, words: list[str]) -> list[list[int]]:
        return [list(self.tokenizer.encode(w, add_special_tokens=False).ids) for w in words if w]


def preprocess(
    facts: TokenizerFacts, prompt: str, stop: list[str], bad: list[str], end_id: int | None,
    images: Sequence[bytes] = (), encode_images: ImageEncoder | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The preprocessing outputs for one request (without the batch dimension)."""
    if not prompt:
        raise ValueError(f"input '{t.TEXT_INPUT}' is empty")
    vision = facts.images
    if images and vision is None:
        raise ValueError("this model does not accept images")
    if vision is not None and images:
        prompt = place_images(prompt, len(images), vision.placeholder)
    ids = facts.encode_prompt(prompt)
    if not ids:
        raise ValueError(f"input '{t.TEXT_INPUT}' tokenizes to nothing")
    # A text-only request has no prompt table at all: Triton's ensemble hands the generation model an absent
    # optional input for an output a step does not produce, as NVIDIA's preprocessing does for its optional
    # prompt_table_extra_ids, whereas a zero-row table would depend on TensorRT-LLM's handling of empty buffers.
    table: npt.NDArray[np.float32] | None = None
    if vision is not None:
        if images:
            assert encode_images is not None
            table = encode_images(list(images))
            if table.shape != (len(images) * vision.tokens_per_image, vision.hidden_size):
                raise ValueError(f"the image encoder answered a table of {list(table.shape)}")
            ids = expand_placeholders(ids, vision.image_token_id, vision.tokens_per_image, facts.vocab_size)
        elif vision.image_token_id in ids:
            raise ValueError(f"the prompt has {vision.placeholder} placeholders but the request has no images")
    special = facts.special_ids
    primary = special.end_ids[0] if end_id is None else end_id
    # Without an end id from the client, the checkpoint's other end ids stop generation too (special_ids.py).
    # An end id the client gives is the client's alone, as in NVIDIA's preprocessing (-1: never stop at one).
    extra_stops = [[e] for e in special.stop_word_end_ids] if end_id is None else []
    stop_ids = facts.encode_words(stop) + extra_stops
    return {
        t.PRE_INPUT_ID: np.array(ids, dtype=np.int32),
        t.PRE_REQUEST_INPUT_LEN: np.array([len(ids)], dtype=np.int32),
        t.PRE_STOP_WORDS_IDS: pack_word_lists(stop_ids),
        t.PRE_BAD_WORDS_IDS: pack_word_lists(facts.encode_words(bad)),
        t.PRE_OUT_END_ID: np.array([primary], dtype=np.int32),
    } | (
        {}
        if table is None
        else {t.PRE_PROMPT_EMBEDDING_TABLE: table, t.PRE_PROMPT_VOCAB_SIZE: np.array([len(table)], dtype=np.int32)}
    )


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        parameters = json.loads(args["model_config"])["parameters"]
        self.facts = TokenizerFacts(Path(parameters["checkpoint_dir"]["string_value"]))
        self.encoder_model = parameters.get("multimodal_encoders", {}).get("string_value", "")
        self.table_dtype = output_dtype(args, t.PRE_PROMPT_EMBEDDING_TABLE)

    def _encode_images(self, images: list[bytes]) -> npt.NDArray[np.float32]:
        """The multimodal_encoders model's features for these images (a BLS call inside this request)."""
        if not self.encoder_model:
            raise ValueError("this model repository has no multimodal_encoders model")
        utils = pb_utils()
        request = utils.InferenceRequest(
            model_name=self.encoder_model,
            inputs=[utils.Tensor(t.ENCODER_IMAGE_BYTES, np.array(images, dtype=np.object_))],
            requested_output_names=[t.ENCODER_OUT_TABLE],
        )
        response = request.exec()
        if response.has_error():
            raise ValueError(response.error().message())
        return np.asarray(utils.get_output_tensor_by_name(response, t.ENCODER_OUT_TABLE).as_numpy(), np.float32)

    def execute(self, requests: list[Any]) -> list[Any]:
        utils = pb_utils()
        responses = []
        for request in requests:
            try:
                prompts = strings(request, t.PRE_QUERY)
                if len(prompts) != 1:
                    raise ValueError(f"input '{t.TEXT_INPUT}' must hold exactly one prompt, got {len(prompts)}")
                end_id = scalar(request, t.PRE_END_ID, None)
                pad_id = scalar(request, t.PRE_PAD_ID, None)
                outputs = preprocess(
                    self.facts,
                    prompts[0],
                    strings(request, t.PRE_STOP_WORDS_DICT),
                    strings(request, t.PRE_BAD_WORDS_DICT),
                    None if end_id is None else int(end_id),
                    _image_bytes(request),
                    self._encode_images,
                )
                pad = self.facts.special_ids.pad_id if pad_id is None else pad_id
                outputs[t.PRE_OUT_PAD_ID] = np.array([pad], dtype=np.int32)
                if t.PRE_PROMPT_EMBEDDING_TABLE in outputs:
                    outputs[t.PRE_PROMPT_EMBEDDING_TABLE] = outputs[t.PRE_PROMPT_EMBEDDING_TABLE].astype(
                        self.table_dtype
                    )
                # Every output gets the batch dimension of one.
                responses.append(
                    utils.InferenceResponse(output_tensors=[tensor(k, v[None, ...]) for k, v in outputs.items()])
                )
            except ValueError as error:
                responses.append(error_response(str(error)))
        return responses


def _image_bytes(request: Any) -> list[bytes]:
    value = optional_tensor(request, t.PRE_IMAGE_BYTES)
    return [] if value is None else [bytes(item) for item in value.reshape(-1)]
