"""Rebuild a Hugging Face `tokenizer.json` from the tokenizer a GGUF file describes.

A GGUF stores the vocabulary, merges, token types and llama.cpp's pre-tokenizer *name*; the splitting
rules behind each name live in llama.cpp's source. The table below restates the ones for byte-level
BPE vocabularies we support. Getting them right matters: SmolLM's pre-tokenizer splits every digit on
its own, and a tokenizer that does not would feed the model token sequences it never saw in training.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from cpu_engine.errors import CheckpointError

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_style() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_style()])


def _regex_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# llama.cpp pre-tokenizer name (`tokenizer.ggml.pre`) → the equivalent `tokenizers` pre-tokenizer. Not
# "default": llama.cpp's name for a file that records none (its own splitting rules, with a warning that
# generation quality degrades), which a file converted by a current llama.cpp never has.
_PRE_TOKENIZERS = {
    **{name: _gpt2_style for name in ("gpt-2", "gpt2", "phi-2", "olmo", "jina-es")},
    **{
        name: _digits_then_gpt2
        for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
    },
    **{name: lambda: _regex_then_bytes(_LLAMA3_SPLIT) for name in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")},
    **{name: lambda: _regex_then_bytes(_QWEN2_SPLIT) for name in ("qwen2", "deepseek-r1-qwen")},
}

# Where llama.cpp takes a whole pre-tokenized word that is in the vocabulary as one token, whatever the merges
# say (as Llama 3's own tokenizer.json does with "ignore_merges").
_IGNORES_MERGES = frozenset({"llama-bpe", "llama3", "llama-v3"})

_TOKEN_TYPE_NORMAL = 1
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


@dataclass(frozen=True)
class GGUFTokenizerData:
    model: str  # tokenizer.ggml.model
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    add_bos: bool


def build_tokenizer(data: GGUFTokenizerData) -> Tokenizer:
    if data.model != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {data.model!r} is not supported (only byte-level BPE, 'gpt2')")
    if data.pre == "default":
        raise CheckpointError(
            "the GGUF file records no pre-tokenizer (tokenizer.ggml.pre), so how it splits text is unknown;"
            " convert the model again with a current llama.cpp (convert_hf_to_gguf.py), which records it"
        )
    if data.pre not in _PRE_TOKENIZERS:
        raise CheckpointError(
            f"GGUF pre-tokenizer {data.pre!r} is not supported; supported: {', '.join(sorted(_PRE_TOKENIZERS))}"
        )
    token_types = data.token_types or [_TOKEN_TYPE_NORMAL] * len(data.tokens)
    if len(token_types) != len(data.tokens):
        raise CheckpointError(f"the GGUF file has {len(token_types)} token types for {len(data.tokens)} tokens")
    vocab = {token: index for index, token in enumerate(data.tokens)}
    merges = [_merge_pair(merge) for merge in data.merges]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=data.pre in _IGNORES_MERGES)
    )
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[data.pre]()  # type: ignore[no-untyped-call]
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, …) must be matched whole before BPE, or the chat markers split into text.
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(data.tokens, token_types, strict=True)
            if kind == _TOKEN_TYPE_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, kind in zip(data.tokens, token_types, strict=True)
            if kind == _TOKEN_TYPE_USER_DEFINED
        ]
    )
    if data.add_bos and data.bos_id is not None:
        bos = data.tokens[data.bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, data.bos_id)]
        )
    return tokenizer


def _merge_pair(merge: str) -> tuple[str, str]:
    left, _, right = merge.partition(" ")
    return left, right
