"""Triton Python model `preprocessing`: prompt text → token ids, stop/bad words → id lists, end/pad ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from triton_models import tensors as t
from triton_models.triton_io import error_response, pb_utils, scalar, strings, tensor
from triton_models.word_lists import pack_word_lists


class TokenizerFacts:
    """The tokenizer and the special ids the generation model needs, read once from the checkpoint."""

    def __init__(self, checkpoint_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
        generation = _read_json(checkpoint_dir / "generation_config.json")
        config = _read_json(checkpoint_dir / "config.json")
        eos = generation.get("eos_token_id", config.get("eos_token_id"))
        self.end_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        if not self.end_ids:
            raise ValueError(f"{checkpoint_dir}: no eos_token_id in generation_config.json or config.json")
        pad = generation.get("pad_token_id", config.get("pad_token_id"))
        self.pad_id = int(pad) if pad is not None else self.end_ids[0]

    def encode_prompt(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def encode_words(self, words: list[str]) -> list[list[int]]:
        return [list(self.tokenizer.encode(w, add_special_tokens=False).ids) for w in words if w]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def preprocess(
    facts: TokenizerFacts, prompt: str, stop: list[str], bad: list[str], end_id: int | None
) -> dict[str, Any]:
    """The preprocessing outputs for one request (without the batch dimension)."""
    if not prompt:
        raise ValueError(f"input '{t.TEXT_INPUT}' is empty")
    ids = facts.encode_prompt(prompt)
    if not ids:
        raise ValueError(f"input '{t.TEXT_INPUT}' tokenizes to nothing")
    primary = facts.end_ids[0] if end_id is None else end_id
    # TensorRT-LLM takes one end id; a checkpoint's other end ids must stop generation too (Llama 3's
    # <|eot_id|> and <|end_of_text|>), so they become single-token stop words.
    stop_ids = facts.encode_words(stop) + [[e] for e in facts.end_ids if e != primary]
    return {
        t.PRE_INPUT_ID: np.array(ids, dtype=np.int32),
        t.PRE_REQUEST_INPUT_LEN: np.array([len(ids)], dtype=np.int32),
        t.PRE_STOP_WORDS_IDS: pack_word_lists(stop_ids),
        t.PRE_BAD_WORDS_IDS: pack_word_lists(facts.encode_words(bad)),
        t.PRE_OUT_END_ID: np.array([primary], dtype=np.int32),
    }


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        parameters = json.loads(args["model_config"])["parameters"]
        self.facts = TokenizerFacts(Path(parameters["checkpoint_dir"]["string_value"]))

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
                )
                outputs[t.PRE_OUT_PAD_ID] = np.array([self.facts.pad_id if pad_id is None else pad_id], dtype=np.int32)
                # Every output gets the batch dimension of one.
                responses.append(
                    utils.InferenceResponse(output_tensors=[tensor(k, v[None, ...]) for k, v in outputs.items()])
                )
            except ValueError as error:
                responses.append(error_response(str(error)))
        return responses
