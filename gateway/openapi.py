"""`GET /openapi.json`: the gateway's OpenAPI 3.1 document, generated from the pydantic models of schema.py
(the request and response bodies) so that the document and the validation can never disagree."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.admin_api import ADAPTER_FILES, TEXT_FIELDS
from gateway.auth import API_KEY_HEADER
from gateway.headers import ADMIN_KEY_HEADER
from gateway.schema import (
    CompletionRequest,
    CompletionResponse,
    CustomModel,
    CustomModelDeleted,
    CustomModelList,
    ModelList,
)

API_VERSION = "4"
REF = "#/components/schemas/{model}"

ERROR_STATUSES = {
    "400": "A field is wrong (the body names it in `param`)",
    "401": "Missing or wrong API key",
    "403": "The key may not use this account",
    "404": "Unknown model",
    "409": "The id is already taken",
    "413": "The body is over the size limit",
    "429": "Over a concurrency limit (see Retry-After)",
    "502": "The inference server answered with an error",
    "503": "No inference server replica is ready, or the gateway is shutting down",
    "504": "The request's deadline passed",
}


class ErrorDetail(BaseModel):
    status: int
    type: str
    message: str
    param: str | None
    request_id: str


class ErrorBody(BaseModel):
    error: ErrorDetail


ADMIN_ERROR_STATUSES = {
    "401": "Missing or wrong admin key",
    "403": "The admin API is off (no admin key is configured)",
}


def _errors(*statuses: str, descriptions: dict[str, str] = ERROR_STATUSES) -> dict[str, Any]:
    body = {"application/json": {"schema": {"$ref": REF.format(model="ErrorBody")}}}
    return {status: {"description": descriptions.get(status, ERROR_STATUSES[status]), "content": body}
            for status in statuses}  # fmt: skip


def _admin_errors(*statuses: str) -> dict[str, Any]:
    return _errors("401", "403", *statuses, descriptions=ADMIN_ERROR_STATUSES)


def _admin_paths(admin_key: list[dict[str, list[str]]]) -> dict[str, Any]:
    """/v4/admin/adapters: custom models (LoRA adapters) registered, listed and removed while serving."""
    upload = {
        "type": "object",
        "required": [*TEXT_FIELDS, *ADAPTER_FILES],
        "properties": {
            "id": {"type": "string", "description": "The custom model's id (what requests name as `model`)"},
            "base_model": {"type": "string", "description": "A served model id the adapter was trained on"},
            ADAPTER_FILES[0]: {"type": "string", "contentMediaType": "application/json"},
            ADAPTER_FILES[1]: {"type": "string", "contentMediaType": "application/octet-stream"},
        },
    }
    return {
        "/v4/admin/adapters": {
            "get": {
                "operationId": "listCustomModels",
                "security": admin_key,
                "responses": {"200": _json("CustomModelList", "The registered custom models"), **_admin_errors()},
            },
            "post": {
                "operationId": "registerCustomModel",
                "security": admin_key,
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": upload}}},
                "responses": {
                    "201": _json("CustomModel", "Registered: requests may name it from now on"),
                    **_admin_errors("400", "409", "413"),
                },
            },
        },
        "/v4/admin/adapters/{custom_id}": {
            "delete": {
                "operationId": "removeCustomModel",
                "security": admin_key,
                "parameters": [{"name": "custom_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {
                    "200": _json("CustomModelDeleted", "Removed"),
                    **_admin_errors("404"),
                },
            }
        },
    }


def _json(model: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF.format(model=model)}}}}


def openapi_document() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = [
        (CompletionRequest, "validation"),
        (CompletionResponse, "serialization"),
        (ModelList, "serialization"),
        (ErrorBody, "serialization"),
        (CustomModel, "serialization"),
        (CustomModelList, "serialization"),
        (CustomModelDeleted, "serialization"),
    ]
    _, definitions = models_json_schema(models, ref_template=REF)
    schemas = definitions.get("$defs", {})
    api_key: list[dict[str, list[str]]] = [{"ApiKey": []}, {}]  # a key when the gateway has keys; none in open mode
    admin_key: list[dict[str, list[str]]] = [{"AdminKey": []}]
    completion_200 = {
        "description": "The completion (JSON), or with `stream: true` server-sent events of the same shape",
        "content": {
            "application/json": {"schema": {"$ref": REF.format(model="CompletionResponse")}},
            # Each event: `data` is a CompletionResponse as JSON; `event: error` carries an ErrorBody instead.
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {
                        "event": {"type": "string", "enum": ["message", "error"]},
                        "data": {"type": "string", "contentMediaType": "application/json"},
                    },
                }
            },
        },
    }
    usage_total = {
        "type": "object",
        "properties": {
            k: {"type": "integer"} for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "triton-completions gateway",
            "version": API_VERSION,
            "description": "The Create Completion API over Triton Inference Server.",
        },
        "paths": {
            "/v4/completions": {
                "post": {
                    "operationId": "createCompletion",
                    "security": api_key,
                    "parameters": [
                        {
                            "name": "x-selected-account-id",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "x-request-timeout",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "number", "exclusiveMinimum": 0},
                        },
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": REF.format(model="CompletionRequest")}}},
                    },
                    "responses": {"200": completion_200, **_errors(*ERROR_STATUSES)},
                }
            },
            "/v4/models": {
                "get": {"operationId": "listModels", "responses": {"200": _json("ModelList", "The served models")}}
            },
            "/v4/usage": {
                "get": {
                    "operationId": "getUsage",
                    "security": api_key,
                    "parameters": [
                        {"name": "account_id", "in": "query", "required": False, "schema": {"type": "string"}},
                        {"name": "from", "in": "query", "required": False, "schema": {"type": "string"}},
                        {"name": "to", "in": "query", "required": False, "schema": {"type": "string"}},
                        {
                            "name": "group_by",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "enum": ["model", "day"]},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "Token totals",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["data", "totals"],
                                        "properties": {
                                            "data": {"type": "array", "items": usage_total},
                                            "totals": usage_total,
                                        },
                                    }
                                }
                            },
                        },
                        **_errors("400", "401", "403", "503"),
                    },
                }
            },
            **_admin_paths(admin_key),
            "/healthz": {"get": {"operationId": "health", "responses": {"200": {"description": "The process is up"}}}},
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "responses": {
                        "200": {"description": "Every model has a ready replica"},
                        "503": {"description": "Some model has no ready replica, or the gateway is draining"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
                "AdminKey": {"type": "apiKey", "in": "header", "name": ADMIN_KEY_HEADER},
            },
        },
    }
