"""The Create Completion API's request and response bodies (spec: shared/spec/completions-api.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

DEFAULT_TEMPERATURE = 0.2
MAX_STOP_SEQUENCES = 4
INT32_MAX = 2**31 - 1  # integer inputs travel to Triton as INT32 tensors

# Unknown fields are ignored (the SDK may send newer ones, e.g. reasoning_effort); types are strict, so
# "0.5" is not a number and "yes" is not a boolean.
_LENIENT_FIELDS_STRICT_TYPES = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class ModelParameters(BaseModel):
    model_config = _LENIENT_FIELDS_STRICT_TYPES

    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = DEFAULT_TEMPERATURE
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    stop_sequences: Annotated[list[StrictStr] | None, Field(max_length=MAX_STOP_SEQUENCES)] = None
    top_k: Annotated[int | None, Field(ge=0, le=INT32_MAX, alias="topK")] = None
    top_p: Annotated[float | None, Field(gt=0.0, le=1.0, alias="topP")] = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0

    @field_validator("stop_sequences")
    @classmethod
    def _non_empty_sequences(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(s == "" for s in value):
            raise ValueError("stop sequences must not be empty strings")
        if value is not None and any("\x00" in s for s in value):
            raise ValueError("stop sequences must not contain NUL characters")
        return value


class ImageInput(BaseModel):
    model_config = _LENIENT_FIELDS_STRICT_TYPES

    image_url: StrictStr
    detail: StrictStr | None = None


class CompletionRequest(BaseModel):
    model_config = _LENIENT_FIELDS_STRICT_TYPES

    model: Annotated[StrictStr, Field(min_length=1)]
    prompt: StrictStr
    account_id: StrictStr | None = None
    images: list[ImageInput] | None = None
    model_parameters: ModelParameters = Field(default_factory=ModelParameters)
    stream: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str) -> str:
        if value == "":
            raise ValueError("the prompt must not be empty")
        if "\x00" in value:  # no tokenizer means anything by it, and C code downstream would cut the text there
            raise ValueError("the prompt must not contain NUL characters")
        return value


FinishReason = Literal["stop", "length"]


class Completion(BaseModel):
    text: str
    finish_reason: FinishReason | None = None
    response_metadata: dict[str, Any] | None = None


class TokenUsage(BaseModel):
    prompt: int
    completion: int
    total: int


class CompletionResponse(BaseModel):
    """The non-streaming body, and the shape of every streamed event."""

    completion: Completion
    token_usage: TokenUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    base_model: str | None = None  # for a custom model (a LoRA adapter): the model it runs on
    context_length: int
    default_max_tokens: int
    accepts_images: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# The admin API (/v4/admin/adapters): custom models as the adapter store keeps them.


class CustomModel(BaseModel):
    """The adapter store's StoredAdapter as the admin API shows it. Its fields are StoredAdapter's: a field the
    store gains and this model lacks is an error (every admin answer fails), never silently dropped."""

    model_config = ConfigDict(extra="forbid")

    id: str
    object: Literal["custom_model"] = "custom_model"
    base_model: str
    task_id: int  # TensorRT-LLM's lora_task_id: a hash of the adapter's tensors
    rank: int
    alpha: float
    target_modules: list[str]
    source_sha256: str  # of the PEFT files it was made from
    created_at: str


class CustomModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CustomModel]


class CustomModelDeleted(BaseModel):
    id: str
    object: Literal["custom_model"] = "custom_model"
    deleted: Literal[True] = True
