"""The gateway's OpenAPI document, and a seeded schemathesis run against it: no 5xx, no hang, every response
as documented (status, content type, body schema)."""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import checks
from schemathesis.generation import GenerationMode

from build_engines.repository import RepositorySettings, render_repository
from gateway.auth import hash_key
from gateway.headers import ADMIN_KEY_HEADER, REQUEST_TIMEOUT_HEADER
from gateway.openapi import openapi_document
from gateway.settings import LoraSettings
from tests.gateway.conftest import MODEL, GatewayThread, RunningGateway, gateway_settings, model_entry
from triton_models import tensors as t
from triton_models.launcher import EmbeddedTriton

ADMIN_KEY = "fuzz-admin-key"  # sent with every case: the admin API's inputs are fuzzed past its key check
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance]  # fmt: skip


@pytest.fixture(scope="module")
def echo_gateway(reference_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """The gateway over the echo generation model: fuzzing exercises everything but the model, quickly."""
    root = tmp_path_factory.mktemp("fuzz")
    settings = RepositorySettings(checkpoint_dir=str(reference_checkpoint), generation_model=t.ECHO_LLM)
    server = EmbeddedTriton(render_repository(settings, root / "repo"), log_path=root / "triton.log").start()
    entry = model_entry(reference_checkpoint, server.grpc_url).model_copy(
        update={"generation_model": t.ECHO_LLM, "lora": LoraSettings(max_rank=8)}  # adapters reach the store's checks
    )
    settings = gateway_settings(
        [entry], max_body_bytes=65536, request_timeout_s=10, admin_key_sha256=hash_key(ADMIN_KEY)
    )
    try:
        with GatewayThread(settings) as running:
            yield running
    finally:
        server.stop()


def test_the_openapi_document_is_served_and_describes_the_api(echo_gateway: RunningGateway) -> None:
    document = requests.get(f"{echo_gateway.url}/openapi.json", timeout=10).json()
    assert document == openapi_document()
    assert set(document["paths"]) == {"/v4/completions", "/v4/models", "/v4/usage", "/v4/admin/adapters",
                                      "/v4/admin/adapters/{custom_id}", "/healthz", "/readyz", "/metrics"}  # fmt: skip
    request = document["components"]["schemas"]["CompletionRequest"]
    assert request["required"] == ["model", "prompt"] and "model_parameters" in request["properties"]
    parameters = document["components"]["schemas"]["ModelParameters"]["properties"]
    assert parameters["temperature"]["maximum"] == 2.0 and "topK" in parameters  # limits and aliases
    upload = document["paths"]["/v4/admin/adapters"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert set(upload["schema"]["required"]) == {"id", "base_model", "adapter_config.json", "adapter_model.safetensors"}
    assert document["components"]["securitySchemes"]["AdminKey"]["name"] == ADMIN_KEY_HEADER


def _served_model_only(document: dict[str, Any]) -> dict[str, Any]:
    """The same document with `model` pinned to the served id: cases then reach generation, not just 404."""
    pinned = copy.deepcopy(document)
    pinned["components"]["schemas"]["CompletionRequest"]["properties"]["model"] = {"type": "string", "enum": [MODEL]}
    return pinned


def test_schemathesis_finds_no_server_error_hang_or_undocumented_response(
    echo_gateway: RunningGateway, request: pytest.FixtureRequest, report: dict[str, Any]
) -> None:
    budget = int(request.config.getoption("--fuzz-cases"))
    document = requests.get(f"{echo_gateway.url}/openapi.json", timeout=10).json()
    statuses: Counter[int] = Counter()
    slowest = 0.0
    session = requests.Session()
    runs = [(document, GenerationMode.POSITIVE), (_served_model_only(document), GenerationMode.POSITIVE),
            (document, GenerationMode.NEGATIVE), (_served_model_only(document), GenerationMode.NEGATIVE)]  # fmt: skip
    # Most of the budget where the inputs are: the completion body, then the usage query and the admin API.
    shares = {
        "/v4/completions": 0.7,
        "/v4/usage": 0.15,
        "/v4/admin/adapters": 0.05,
        "/v4/admin/adapters/{custom_id}": 0.03,
    }

    def fuzz(operation: Any, mode: GenerationMode, examples: int) -> None:
        @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            nonlocal slowest
            # The right admin key, over any the case generated for the AdminKey scheme: the cases reach the
            # admin API's inputs (its key checks have their own tests).
            case.headers = {**(case.headers or {}), ADMIN_KEY_HEADER: ADMIN_KEY}
            started = time.monotonic()
            response = case.call(base_url=echo_gateway.url, session=session, timeout=15)
            slowest = max(slowest, time.monotonic() - started)
            statuses[response.status_code] += 1
            # A 504 is the documented answer when the case itself set a short deadline and the echo of a long
            # max_tokens outlasted it (timing-dependent on a busy machine); any other 5xx is a failure.
            asked_deadline = REQUEST_TIMEOUT_HEADER in {k.lower() for k in (case.headers or {})}
            if response.status_code == 504 and asked_deadline:
                assert response.json()["error"]["type"] == "timeout", response.text
                return  # (schemathesis's own not-a-server-error check would count it)
            assert response.status_code < 500, response.text
            if mode is GenerationMode.POSITIVE:  # valid input: answered exactly as documented
                case.validate_response(response, checks=CHECKS)

        try:
            run()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # an operation without inputs has no invalid ones

    for schema_document, mode in runs:
        for result in schemathesis.openapi.from_dict(schema_document).get_all_operations():
            operation = result.ok()
            fuzz(operation, mode, max(5, int(budget * shares.get(operation.path, 0.0) / len(runs))))
    total = sum(statuses.values())
    server_errors = sum(count for status, count in statuses.items() if status >= 500 and status != 504)
    assert total >= budget // 2 and server_errors == 0 and slowest < 15
    assert statuses[200] > 0 and statuses[400] > 0  # both valid and invalid requests were really exercised
    report.update({
        "check": "schemathesis against /openapi.json (seeded)", "fuzz cases": total, "5xx": server_errors,
        "errors seen by clients": ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())),
        "recovery": f"slowest response {slowest:.2f} s",
    })  # fmt: skip
