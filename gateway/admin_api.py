"""`/v4/admin/adapters`: register, list and remove custom models (LoRA adapters) while serving.

Protected by the admin key (header x-admin-key; its sha256 is the admin_key_sha256 setting; without one the
admin API is off). Registration takes the adapter's two PEFT files as a multipart upload, streamed to disk
with a size cap, then validated and converted by the adapter store exactly as
`python -m build_engines adapter` does; a refused adapter leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hmac
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from build_engines.adapter_store import AdapterError, AdapterExists, StoredAdapter
from gateway.auth import hash_key
from gateway.errors import (
    AuthenticationFailed,
    Conflict,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    PermissionDenied,
)
from gateway.headers import ADMIN_KEY_HEADER
from gateway.schema import CustomModel, CustomModelDeleted, CustomModelList
from gateway.state import REGISTRY, SETTINGS

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # the multipart file fields
TEXT_FIELDS = ("id", "base_model")
_MAX_TEXT_FIELD_BYTES = 1024


def _check_admin(request: web.Request) -> None:
    expected = request.app[SETTINGS].admin_key_sha256
    if expected is None:
        raise PermissionDenied("the admin API is off: no admin key is configured (admin_key_sha256)")
    key = request.headers.get(ADMIN_KEY_HEADER)
    if not key:
        raise AuthenticationFailed(f"the admin API needs the admin key in the {ADMIN_KEY_HEADER} header")
    if not hmac.compare_digest(hash_key(key), expected):
        raise AuthenticationFailed("the admin key is not valid")


def _describe(adapter: StoredAdapter) -> CustomModel:
    return CustomModel.model_validate(asdict(adapter), strict=False)


async def list_adapters(request: web.Request) -> web.Response:
    _check_admin(request)
    custom = request.app[REGISTRY].custom_models()
    listing = CustomModelList(data=[_describe(a) for a in custom.values()])
    return web.json_response(listing.model_dump(mode="json"))


async def register_adapter(request: web.Request) -> web.Response:
    _check_admin(request)
    registry = request.app[REGISTRY]
    settings = request.app[SETTINGS]
    upload = registry.adapters.root / f".upload-{uuid.uuid4().hex}"
    try:
        fields = await _receive(request, upload, settings.max_adapter_bytes)
        custom_id, base_id = fields.get("id", ""), fields.get("base_model", "")
        if not custom_id:
            raise InvalidRequest("the form field 'id' (the custom model id) is required", param="id")
        if not base_id:
            raise InvalidRequest("the form field 'base_model' is required", param="base_model")
        base = registry.models.get(base_id)
        if base is None:
            raise InvalidRequest(f"base model '{base_id}' is not served here", param="base_model")
        try:
            stored = await asyncio.to_thread(
                registry.adapters.register,
                custom_id,
                base_id,
                base.entry.tokenizer_dir,
                base.entry.lora_support,
                upload,
                set(registry.models),
            )
        except AdapterExists as error:
            raise Conflict(str(error), param=error.field) from None
        except AdapterError as error:
            raise InvalidRequest(str(error), param=error.field) from None
    finally:
        shutil.rmtree(upload, ignore_errors=True)
    return web.json_response(_describe(stored).model_dump(mode="json"), status=201)


async def remove_adapter(request: web.Request) -> web.Response:
    _check_admin(request)
    custom_id = request.match_info["custom_id"]
    if not request.app[REGISTRY].adapters.remove(custom_id):
        raise ModelNotFound(f"custom model '{custom_id}' is not registered", param="custom_id")
    return web.json_response(CustomModelDeleted(id=custom_id).model_dump(mode="json"))


async def _receive(request: web.Request, directory: Path, max_bytes: int) -> dict[str, str]:
    """The text fields; the adapter files are written into `directory` (at most max_bytes in all)."""
    if not request.content_type.startswith("multipart/"):
        raise InvalidRequest(
            f"send the adapter as multipart/form-data with fields {list(TEXT_FIELDS)} and files {list(ADAPTER_FILES)}",
            param="content-type",
        )
    directory.mkdir(parents=True)
    try:
        return await _receive_parts(await request.multipart(), directory, max_bytes)
    except (HttpProcessingError, ValueError, LookupError, RuntimeError) as error:
        # aiohttp's reader on a malformed body: bad part headers or boundary (HttpProcessingError, ValueError),
        # an unknown charset (LookupError), an unknown content or transfer encoding (RuntimeError).
        raise InvalidRequest(f"the multipart body is malformed: {error}", param="multipart") from None


async def _receive_parts(reader: MultipartReader, directory: Path, max_bytes: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    received, total = set(), 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise InvalidRequest("nested multipart bodies are not accepted", param="content-type")
        name = part.name or ""
        if name in TEXT_FIELDS:
            value = await part.read(decode=True)
            if len(value) > _MAX_TEXT_FIELD_BYTES:
                raise InvalidRequest(f"the form field '{name}' is too long", param=name)
            fields[name] = value.decode("utf-8", errors="replace").strip()
        elif name in ADAPTER_FILES:
            with (directory / name).open("wb") as out:
                while chunk := await part.read_chunk(1 << 20):
                    total += len(chunk)
                    if total > max_bytes:
                        raise PayloadTooLarge(f"the adapter is larger than {max_bytes} bytes (max_adapter_bytes)")
                    out.write(chunk)
            received.add(name)
        else:
            raise InvalidRequest(
                f"unexpected form field {name!r}; expected {list(TEXT_FIELDS)} and files {list(ADAPTER_FILES)}",
                param=name or "multipart",
            )
    missing = [f for f in ADAPTER_FILES if f not in received]
    if missing:
        raise InvalidRequest(f"the adapter files {missing} are missing from the upload", param=missing[0])
    return fields
