"""What the ledger stores: one UsageRecord per completion request."""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field

COLUMNS = (
    "record_id",
    "created_at",
    "day",
    "request_id",
    "account_id",
    "api_key_id",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "status",
    "time_to_first_token_ms",
    "duration_ms",
)


@dataclass(frozen=True)
class UsageRecord:
    created_at: float  # Unix time the request arrived
    request_id: str
    account_id: str | None
    api_key_id: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    status: int
    time_to_first_token_ms: float | None
    duration_ms: float
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def day(self) -> str:
        return datetime.datetime.fromtimestamp(self.created_at, datetime.UTC).date().isoformat()

    def row(self) -> tuple[object, ...]:
        return tuple(self.day if name == "day" else _storable(getattr(self, name)) for name in COLUMNS)


# Longer text is cut: PostgreSQL refuses index entries past ~2.7 kB, and no id or model name is that long.
MAX_TEXT_CHARS = 512


def _storable(value: object) -> object:
    """Text every database accepts, so that one odd value can never block every later row: a string that is not
    valid Unicode (an unpaired surrogate, e.g. from a header that was not UTF-8) gets "?" in its place, NUL
    (which PostgreSQL text cannot hold) U+FFFD, and it is cut to MAX_TEXT_CHARS."""
    if not isinstance(value, str):
        return value
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value.replace("\x00", "\ufffd")[:MAX_TEXT_CHARS]
