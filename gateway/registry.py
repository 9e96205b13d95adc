"""The served models: public id → ensemble, generation model, tokenizer (loaded once) and Triton replicas;
and custom models (LoRA adapters from the adapter store), each resolved to its base model plus the adapter."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

from tokenizers import Tokenizer

from build_engines.adapter_store import AdapterStore, StoredAdapter
from gateway.admission import ModelAdmission
from gateway.errors import InvalidRequest, ModelNotFound
from gateway.replicas import EndpointDirectory, ReplicaPool
from gateway.schema import ModelCard
from gateway.settings import ConfigError, GatewaySettings, ModelEntry
from gateway.triton_translation import LoraRequest
from triton_models.image_prompt import ImageSlots, place_images, prompt_tokens_with_images

# Prompts up to this many characters are tokenized on the event loop (≈2 ms at most): a thread's hand-off
# would cost more than it saves.
INLINE_TOKENIZE_MAX_CHARS = 4096


@dataclass
class ServedModel:
    entry: ModelEntry
    tokenizer: Tokenizer
    replicas: ReplicaPool
    admission: ModelAdmission
    images: ImageSlots | None = None  # set when the model accepts images

    async def count_prompt_tokens(self, prompt: str, images: int = 0) -> int:
        """What the model reads, as the ensemble's preprocessing builds it: the same tokenizer, the images'
        placeholders placed the same way, each expanded to its image's tokens (usage counts those)."""
        if not images or self.images is None:
            return await self._count_tokens(prompt)
        try:
            text = place_images(prompt, images, self.images.placeholder)
        except ValueError as error:
            raise InvalidRequest(str(error), param="prompt") from None
        return prompt_tokens_with_images(await self._count_tokens(text), images, self.images.tokens_per_image)

    async def _count_tokens(self, text: str) -> int:
        if len(text) <= INLINE_TOKENIZE_MAX_CHARS:
            return len(self.tokenizer.encode(text).ids)
        # A long prompt takes the tokenizer up to ~0.7 s (1 MB): in a thread, with encode_batch, which releases
        # the GIL (encode does not), so every other stream keeps flowing meanwhile.
        [encoding] = await asyncio.to_thread(self.tokenizer.encode_batch, [text])
        return len(encoding.ids)

    def resolve_max_tokens(self, requested: int | None, prompt_tokens: int) -> int:
        context = self.entry.context_length
        room = context - prompt_tokens
        if requested is None:
            if room < 1:
                raise InvalidRequest(
                    f"the prompt has {prompt_tokens} tokens, which leaves no room in the model's context "
                    f"length of {context}",
                    param="prompt",
                )
            return min(room, self.entry.default_max_tokens)
        if prompt_tokens + requested > context:
            raise InvalidRequest(
                f"prompt tokens ({prompt_tokens}) + max_tokens ({requested}) = {prompt_tokens + requested} "
                f"exceeds the model's context length of {context}",
                param="model_parameters.max_tokens",
            )
        return requested

    def card(self, adapter: StoredAdapter | None = None) -> ModelCard:
        e = self.entry
        return ModelCard(
            id=e.id if adapter is None else adapter.id,
            base_model=None if adapter is None else e.id,
            context_length=e.context_length,
            default_max_tokens=e.default_max_tokens,
            accepts_images=e.accepts_images,
        )


@dataclass(frozen=True)
class ResolvedModel:
    """What a request's `model` names: a served model, or a custom model = its base + a LoRA adapter."""

    base: ServedModel
    adapter: StoredAdapter | None = None
    lora: LoraRequest | None = None

    @property
    def id(self) -> str:
        return self.base.entry.id if self.adapter is None else self.adapter.id


class ModelRegistry:
    def __init__(self, models: list[ServedModel], adapters: AdapterStore) -> None:
        self.models = {m.entry.id: m for m in models}
        self.adapters = adapters
        self._custom: dict[str, StoredAdapter] = {}
        self._custom_version: int | None = None

    def get(self, model_id: str) -> ServedModel:
        try:
            return self.models[model_id]
        except KeyError:
            raise ModelNotFound(f"model '{model_id}' is not served here", param="model") from None

    def resolve(self, model_id: str) -> ResolvedModel:
        served = self.models.get(model_id)
        if served is not None:
            return ResolvedModel(served, None)
        adapter = self.custom_models().get(model_id)
        if adapter is None or adapter.base_model not in self.models:
            raise ModelNotFound(f"model '{model_id}' is not served here", param="model")
        load = functools.partial(adapter.tensors, self.adapters.root)
        base = self.models[adapter.base_model]
        dtype = base.entry.lora.weights_dtype if base.entry.lora is not None else "float16"
        return ResolvedModel(base, adapter, LoraRequest(adapter.task_id, load, dtype, model_id=adapter.id))

    def custom_models(self) -> dict[str, StoredAdapter]:
        """The registered custom models, re-read when the store changed (one stat per call otherwise)."""
        version = self.adapters.version()
        if version != self._custom_version:
            self._custom = {a.id: a for a in self.adapters.list()}
            self._custom_version = version
        return self._custom

    def cards(self) -> list[ModelCard]:
        cards = [m.card() for m in self.models.values()]
        for adapter in self.custom_models().values():
            base = self.models.get(adapter.base_model)
            if base is not None:
                cards.append(base.card(adapter))
        return cards

    @classmethod
    def load(cls, settings: GatewaySettings, directory: EndpointDirectory) -> ModelRegistry:
        served = []
        for entry in settings.models:
            path = entry.tokenizer_dir / "tokenizer.json"
            try:
                tokenizer = Tokenizer.from_file(str(path))
            except Exception as error:  # tokenizers raises a bare Exception naming no file
                raise ConfigError(f"model '{entry.id}': cannot load its tokenizer {path}: {error}") from None
            admission = ModelAdmission(
                entry.id,
                entry.max_concurrent,
                settings.max_concurrent_per_account,
                settings.max_queued,
                settings.retry_after_s,
            )
            images = ImageSlots.from_checkpoint(entry.tokenizer_dir, tokenizer) if entry.accepts_images else None
            replicas = ReplicaPool(
                entry, directory, stalled_after_s=settings.replica_stall_timeout_s,
                probe_interval_s=settings.replica_probe_interval_s,
            )  # fmt: skip
            served.append(ServedModel(entry, tokenizer, replicas, admission, images))
        return cls(served, AdapterStore(settings.adapter_store))
