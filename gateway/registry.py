"""The served models: public id → ensemble, generation model, tokenizer (loaded once) and Triton replicas."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from gateway.admission import ModelAdmission
from gateway.errors import InvalidRequest, ModelNotFound
from gateway.replicas import EndpointDirectory, ReplicaPool
from gateway.schema import ModelCard
from gateway.settings import GatewaySettings, ModelEntry


@dataclass
class ServedModel:
    entry: ModelEntry
    tokenizer: Tokenizer
    replicas: ReplicaPool
    admission: ModelAdmission

    def count_prompt_tokens(self, prompt: str) -> int:
        # The same tokenizer as the ensemble's preprocessing, so the counts agree.
        return len(self.tokenizer.encode(prompt).ids)

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

    def card(self) -> ModelCard:
        e = self.entry
        return ModelCard(
            id=e.id,
            context_length=e.context_length,
            default_max_tokens=e.default_max_tokens,
            accepts_images=e.accepts_images,
        )


class ModelRegistry:
    def __init__(self, models: list[ServedModel]) -> None:
        self.models = {m.entry.id: m for m in models}

    def get(self, model_id: str) -> ServedModel:
        try:
            return self.models[model_id]
        except KeyError:
            raise ModelNotFound(f"model '{model_id}' is not served here", param="model") from None

    @classmethod
    def load(cls, settings: GatewaySettings, directory: EndpointDirectory) -> ModelRegistry:
        served = []
        for entry in settings.models:
            tokenizer = Tokenizer.from_file(str(entry.tokenizer_dir / "tokenizer.json"))
            admission = ModelAdmission(
                entry.id,
                entry.max_concurrent,
                settings.max_concurrent_per_account,
                settings.max_queued,
                settings.retry_after_s,
            )
            served.append(ServedModel(entry, tokenizer, ReplicaPool(entry, directory), admission))
        return cls(served)
