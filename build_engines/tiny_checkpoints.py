"""Deterministic tiny random-weight Llama checkpoints for fast tests.

Two tokenizer styles, the two families real checkpoints come in:

- `byte_bpe`: byte-level BPE (GPT-2 / Llama 3 / SmolLM): every byte has a printable stand-in character,
  spaces are part of the following token ("Ġworld"), tied embeddings, plain RoPE.
- `sentencepiece`: metaspace ("▁world") with byte fallback (Llama 2): characters outside the learned
  alphabet become `<0xNN>` byte tokens, a BOS token is prepended, untied embeddings, Llama 3 RoPE scaling.

The same arguments always give byte-identical files: tokenizers are trained on a built-in corpus and
weights come from a seeded generator.
"""

from __future__ import annotations

import enum
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from build_engines.hf_checkpoint import LlamaShape, SpecialTokens, write_checkpoint


class TokenizerStyle(enum.StrEnum):
    BYTE_BPE = "byte_bpe"
    SENTENCEPIECE = "sentencepiece"


# Training text: enough English for real merges, plus accented, CJK and emoji text so multi-byte
# characters appear both as learned tokens and (for the sentencepiece style) as byte fallbacks.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, there was a little girl who loved to play in the garden.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    "In 2024 the team shipped 12 releases, 3 of them on a Friday.",
    "def add(a, b):\n    return a + b\n",
    "Café, naïve, résumé, jalapeño, Ångström and Übermensch are borrowed words.",
    "东京是日本的首都。北京是中国的首都。",
    "Emoji travel well: 🙂 🚀 🎉 👍 and 🇫🇷 are all multi-byte characters.",
    "Numbers like 3.14159 and 2.71828 show up in mathematics all the time.",
    "A stitch in time saves nine, and an apple a day keeps the doctor away.",
    "Hello world! Hello there! Hello again, world.",
]
_SPECIAL_BYTE_BPE = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    return _CORPUS * 8


def byte_bpe_tokenizer(vocab_size: int = 512) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIAL_BYTE_BPE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def sentencepiece_tokenizer(vocab_size: int = 420) -> Tokenizer:
    """Llama 2 layout: <unk>=0, <s>=1, </s>=2, <0x00>..<0xFF>=3..258, then learned pieces."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = metaspace
    learned_size = vocab_size - 256
    trainer = trainers.BpeTrainer(vocab_size=learned_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    # Learn from the ASCII sentences only: every other character then needs the byte fallback, which is the
    # behaviour under test (and a fixed alphabet keeps training deterministic).
    learner.train_from_iterator([line for line in _corpus() if line.isascii()], trainer=trainer)
    learned = learner.get_vocab()
    specials = ["<unk>", "<s>", "</s>"]
    ordered = specials + [f"<0x{b:02X}>" for b in range(256)]
    ordered += sorted((t for t in learned if t not in specials), key=lambda t: learned[t])
    vocab = {token: index for index, token in enumerate(ordered)}
    merges = [(m[0], m[1]) for m in _merges_of(learner)]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = metaspace
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def _merges_of(tokenizer: Tokenizer) -> list[list[str]]:
    import json

    model = json.loads(tokenizer.to_str())["model"]
    return [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]


def _token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{token!r} is not in the vocabulary")
    return int(token_id)


def _random_weights(shape: LlamaShape, seed: int) -> dict[str, npt.NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    head_dim = shape.resolved_head_dim

    def matrix(rows: int, cols: int, gain: float = 1.0) -> npt.NDArray[np.float32]:
        # Scaled so activations keep unit size and logits are peaked: greedy choices are then far from ties,
        # which keeps float32 rounding differences between implementations from changing the argmax.
        return np.asarray(rng.standard_normal((rows, cols)) * gain / np.sqrt(cols), dtype=np.float32)

    def norm(size: int) -> npt.NDArray[np.float32]:
        return (1.0 + 0.1 * rng.standard_normal(size)).astype(np.float32)

    h, i = shape.hidden_size, shape.intermediate_size
    tensors = {"model.embed_tokens.weight": (rng.standard_normal((shape.vocab_size, h))).astype(np.float32)}
    for layer in range(shape.num_layers):
        p = f"model.layers.{layer}."
        tensors[p + "input_layernorm.weight"] = norm(h)
        tensors[p + "self_attn.q_proj.weight"] = matrix(shape.num_heads * head_dim, h, 2.0)
        tensors[p + "self_attn.k_proj.weight"] = matrix(shape.num_kv_heads * head_dim, h, 2.0)
        tensors[p + "self_attn.v_proj.weight"] = matrix(shape.num_kv_heads * head_dim, h)
        tensors[p + "self_attn.o_proj.weight"] = matrix(h, shape.num_heads * head_dim, 4.0)
        tensors[p + "post_attention_layernorm.weight"] = norm(h)
        tensors[p + "mlp.gate_proj.weight"] = matrix(i, h)
        tensors[p + "mlp.up_proj.weight"] = matrix(i, h)
        tensors[p + "mlp.down_proj.weight"] = matrix(h, i, 4.0)
    tensors["model.norm.weight"] = norm(h)
    if not shape.tie_word_embeddings:
        tensors["lm_head.weight"] = matrix(shape.vocab_size, h, 4.0)
    return tensors


def write_tiny_checkpoint(out_dir: Path, style: TokenizerStyle, seed: int = 0, context_length: int = 512) -> Path:
    """Write a tiny checkpoint of the given tokenizer style into out_dir."""
    if style is TokenizerStyle.BYTE_BPE:
        tokenizer = byte_bpe_tokenizer()
        ids = {t: _token_id(tokenizer, t) for t in _SPECIAL_BYTE_BPE}
        special = SpecialTokens(
            bos="<|im_start|>", eos="<|im_end|>", unk="<|endoftext|>", pad="<|im_end|>",
            end_ids=(ids["<|im_end|>"], ids["<|endoftext|>"]), bos_id=ids["<|im_start|>"],
            pad_id=ids["<|im_end|>"], chat_template=_CHAT_TEMPLATE,
        )  # fmt: skip
        rope_scaling = None
        tied = True
    else:
        tokenizer = sentencepiece_tokenizer()
        special = SpecialTokens(
            bos="<s>", eos="</s>", unk="<unk>", pad=None, end_ids=(2,), bos_id=1, pad_id=None, add_bos=True
        )
        rope_scaling = {
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        }  # fmt: skip
        tied = False
    shape = LlamaShape(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=160,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=context_length,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        rope_scaling=rope_scaling,
    )
    return write_checkpoint(
        out_dir, shape, special, _random_weights(shape, seed), tokenizer, f"tiny {style.value} checkpoint, seed {seed}"
    )
