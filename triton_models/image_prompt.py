"""Where a prompt's images go (LLaVA's convention), shared by preprocessing and the gateway's token count.

The prompt marks each image's place with the model's image token (`<image>`); a prompt without any gets
one per image in front, each on its own line, as LLaVA's own prompts begin. Each placeholder token then
becomes that image's rows of the prompt table: TensorRT-LLM's p-tuning ids, vocab_size + row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from cpu_engine.vision import VisionConfig


@dataclass(frozen=True)
class ImageSlots:
    """How a vision-language checkpoint's prompt holds images: its image token (as text and id), how many rows
    of the prompt table each image becomes, and how wide those rows are."""

    placeholder: str
    image_token_id: int
    tokens_per_image: int
    hidden_size: int

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path, tokenizer: Tokenizer) -> ImageSlots:
        vision = VisionConfig.from_checkpoint(checkpoint_dir)
        placeholder = tokenizer.id_to_token(vision.image_token_id)
        if placeholder is None:
            raise ValueError(f"{checkpoint_dir}: the tokenizer has no image token (id {vision.image_token_id})")
        return cls(placeholder, vision.image_token_id, vision.tokens_per_image, vision.text_hidden_size)


def place_images(prompt: str, images: int, placeholder: str) -> str:
    """The prompt with exactly one placeholder per image; ValueError when the prompt has another count."""
    found = prompt.count(placeholder)
    if found == 0:
        return f"{placeholder}\n" * images + prompt
    if found != images:
        raise ValueError(f"the prompt has {found} {placeholder} placeholders for {images} images")
    return prompt


def expand_placeholders(ids: list[int], image_token_id: int, tokens_per_image: int, vocab_size: int) -> list[int]:
    """Each placeholder id becomes tokens_per_image ids of the prompt table, images in order."""
    expanded: list[int] = []
    row = vocab_size
    for token in ids:
        if token == image_token_id:
            expanded.extend(range(row, row + tokens_per_image))
            row += tokens_per_image
        else:
            expanded.append(token)
    return expanded


def prompt_tokens_with_images(text_tokens: int, images: int, tokens_per_image: int) -> int:
    """What the model reads: the text's tokens with each placeholder replaced by its image's tokens."""
    return text_tokens + images * (tokens_per_image - 1)
