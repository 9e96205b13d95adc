"""Custom models: LoRA adapters registered by id (CLI and admin API) and served on the shared base engine,
against a real Triton server whose LoRA cache holds two adapters."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import scale_gp
from tokenizers import Tokenizer

from build_engines.repository import RepositorySettings, render_repository
from build_engines.tiny_checkpoints import TokenizerStyle
from gateway.auth import hash_key
from gateway.completions import _request_for
from gateway.errors import ModelNotFound
from gateway.registry import ModelRegistry
from gateway.replicas import EndpointDirectory
from gateway.settings import GatewaySettings, LoraSettings
from gateway.triton_channel import TritonEndpoint
from gateway.triton_translation import GenerationPlan
from tests.conftest import SESSION_LORA_MAX_RANK
from tests.gateway.conftest import MODEL, GatewayThread, RunningGateway, gateway_settings, model_entry
from tests.hf_reference import hf_greedy
from tests.peft_adapters import load_reference_with_adapter, write_random_adapter
from tests.prompts import VARIED_PROMPTS
from tests.triton_client import metric_value
from triton_models.launcher import EmbeddedTriton
from triton_models.token_bytes import TokenBytes

pytestmark = pytest.mark.transformers

ADMIN_KEY = "admin-secret"
MAX_RANK = 16
CACHE_ADAPTERS = 2
QV_MODEL = "smollm2-qv"  # the same engine, declared as built with LoRA for q_proj and v_proj only
NEW_TOKENS = 24
PROMPTS = VARIED_PROMPTS[:3]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adapters(reference_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    made = {
        name: write_random_adapter(reference_checkpoint, root / name, seed=seed, half_precision=True)
        for name, seed in (("a1", 11), ("a2", 12), ("a3", 13))
    }
    made["rank32"] = write_random_adapter(reference_checkpoint, root / "rank32", seed=14, rank=32, alpha=64.0)
    return made


@pytest.fixture(scope="module")
def lora_triton(reference_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    root = tmp_path_factory.mktemp("lora-triton")
    settings = RepositorySettings(
        checkpoint_dir=str(reference_checkpoint), lora_max_rank=MAX_RANK, lora_cache_max_adapters=CACHE_ADAPTERS
    )
    server = EmbeddedTriton(render_repository(settings, root / "repository"), log_path=root / "triton.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def settings(reference_checkpoint: Path, lora_triton: EmbeddedTriton) -> GatewaySettings:
    base = model_entry(reference_checkpoint, lora_triton.grpc_url)
    qv = base.model_copy(
        update={"id": QV_MODEL, "lora": LoraSettings(max_rank=MAX_RANK, target_modules=["q_proj", "v_proj"])}
    )
    return gateway_settings(
        [base.model_copy(update={"lora": LoraSettings(max_rank=MAX_RANK)}), qv], admin_key_sha256=hash_key(ADMIN_KEY)
    )


@pytest.fixture(scope="module")
def gateway(settings: GatewaySettings) -> Iterator[RunningGateway]:
    with GatewayThread(settings) as running:
        yield running


@pytest.fixture(scope="module")
def config_file(settings: GatewaySettings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same settings as a config file, for the command line."""
    path = tmp_path_factory.mktemp("config") / "gateway.toml"
    lines = [f'data_dir = "{settings.data_dir}"']
    for model in settings.models:
        assert model.lora is not None
        lines += [
            "[[models]]", f'id = "{model.id}"', f'tokenizer_dir = "{model.tokenizer_dir}"',
            f"context_length = {model.context_length}", f"endpoints = {json.dumps(model.endpoints)}",
            f"lora = {{ max_rank = {model.lora.max_rank}, target_modules = {json.dumps(model.lora.target_modules)} }}",
        ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "build_engines", "adapter", "--config", str(config), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)


async def _upload(
    url: str, fields: dict[str, str], files: dict[str, bytes], key: str | None = ADMIN_KEY
) -> tuple[int, Any]:
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    for name, content in files.items():
        form.add_field(name, io.BytesIO(content), filename=name, content_type="application/octet-stream")
    headers = {} if key is None else {"x-admin-key": key}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v4/admin/adapters", data=form, headers=headers) as response,
    ):
        return response.status, await response.json()


def _files(adapter: Path) -> dict[str, bytes]:
    return {name: (adapter / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def _register(url: str, custom_id: str, adapter: Path, base: str = MODEL) -> tuple[int, Any]:
    return asyncio.run(_upload(url, {"id": custom_id, "base_model": base}, _files(adapter)))


async def _admin(url: str, method: str, path: str, key: str | None = ADMIN_KEY) -> tuple[int, Any]:
    headers = {} if key is None else {"x-admin-key": key}
    async with aiohttp.ClientSession() as session, session.request(method, f"{url}{path}", headers=headers) as response:
        return response.status, await response.json()


async def _complete(session: aiohttp.ClientSession, url: str, model: str, prompt: str) -> tuple[int, Any]:
    body = {"model": model, "prompt": prompt, "model_parameters": {"max_tokens": NEW_TOKENS, "temperature": 0}}
    async with session.post(f"{url}/v4/completions", json=body) as response:
        return response.status, await response.json()


def _texts(url: str, models: list[str], prompts: list[str]) -> list[str]:
    """Greedy completions, all sent at once; each must succeed."""

    async def run() -> list[tuple[int, Any]]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(_complete(session, url, m, p) for m, p in zip(models, prompts, strict=True)))

    answers = asyncio.run(run())
    assert [status for status, _ in answers] == [200] * len(models), answers
    return [body["completion"]["text"] for _, body in answers]


def _expected_text(checkpoint: Path, model: Any, prompt: str) -> str:
    """transformers' greedy continuation as the served text: its tokens' bytes (as postprocessing emits them),
    cut where the served model stops (its end-of-sequence id), decoded as the gateway decodes."""
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    ids = hf_greedy(model, tokenizer.encode(prompt).ids, NEW_TOKENS)
    eos = json.loads((checkpoint / "generation_config.json").read_text())["eos_token_id"]
    end_ids = set(eos if isinstance(eos, list) else [eos])
    cut = next((i for i, token in enumerate(ids) if token in end_ids), len(ids))
    return TokenBytes(tokenizer).join(ids[:cut]).decode("utf-8", errors="replace")


def _lora_metric(server: EmbeddedTriton, name: str) -> float:
    return metric_value(server.metrics_url, f"cpu_llm_lora_{name}")


def _store_entries(settings: GatewaySettings) -> list[str]:
    root = settings.adapter_store
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_an_adapter_registered_from_the_command_line_answers_like_transformers_and_peft(
    gateway: RunningGateway, config_file: Path, adapters: dict[str, Path], reference_checkpoint: Path
) -> None:
    run = _cli(config_file, "--base", MODEL, "--adapter", str(adapters["a1"]), "--id", "ft:a1")
    assert run.returncode == 0, run.stderr
    assert "registered ft:a1 on smollm2-135m-instruct (rank 8" in run.stdout
    # The running gateway serves it without a restart, through the official SDK.
    client = scale_gp.SGPClient(base_url=gateway.url, api_key="test-key", max_retries=0)
    try:
        served = [
            client.completions.create(
                model="ft:a1", prompt=p, model_parameters={"max_tokens": NEW_TOKENS, "temperature": 0}
            ).completion.text
            for p in PROMPTS
        ]
    finally:
        client.close()
    reference = load_reference_with_adapter(reference_checkpoint, adapters["a1"])
    assert served == [_expected_text(reference_checkpoint, reference, p) for p in PROMPTS]
    base = _texts(gateway.url, [MODEL] * len(PROMPTS), PROMPTS)
    assert all(a != b for a, b in zip(served, base, strict=True))  # the adapter really changes the answer


def test_adapters_on_the_tiny_checkpoints_answer_like_transformers_and_peft_through_the_gateway(
    tiny_checkpoints: dict[TokenizerStyle, Path], tiny_tritons: dict[TokenizerStyle, EmbeddedTriton], tmp_path: Path
) -> None:
    for style, checkpoint in tiny_checkpoints.items():
        entry = model_entry(checkpoint, tiny_tritons[style].grpc_url, model_id=f"tiny-{style.value}")
        entry = entry.model_copy(update={"lora": LoraSettings(max_rank=SESSION_LORA_MAX_RANK)})
        modules = ["q_proj", "v_proj", "o_proj", "up_proj"]
        adapter = write_random_adapter(
            checkpoint, tmp_path / style.value, seed=21, rank=4, alpha=8.0, target_modules=modules, half_precision=True
        )
        with GatewayThread(gateway_settings([entry], admin_key_sha256=hash_key(ADMIN_KEY))) as running:
            status, _ = asyncio.run(_upload(running.url, {"id": "tiny-ft", "base_model": entry.id}, _files(adapter)))
            assert status == 201
            served = _texts(running.url, ["tiny-ft"] * len(PROMPTS), PROMPTS)
            base = _texts(running.url, [entry.id] * len(PROMPTS), PROMPTS)
        reference = load_reference_with_adapter(checkpoint, adapter)
        assert served == [_expected_text(checkpoint, reference, p) for p in PROMPTS], style
        assert served != base, style


def test_the_admin_api_registers_lists_and_removes_custom_models(
    gateway: RunningGateway, adapters: dict[str, Path], reference_checkpoint: Path
) -> None:
    status, body = _register(gateway.url, "ft-a2", adapters["a2"])
    assert status == 201 and body["id"] == "ft-a2" and body["base_model"] == MODEL and body["rank"] == 8
    status, listed = asyncio.run(_admin(gateway.url, "GET", "/v4/admin/adapters"))
    assert status == 200 and "ft-a2" in [a["id"] for a in listed["data"]]
    status, models = asyncio.run(_admin(gateway.url, "GET", "/v4/models", key=None))
    cards = {m["id"]: m for m in models["data"]}
    assert cards["ft-a2"]["base_model"] == MODEL and cards[MODEL]["base_model"] is None
    reference = load_reference_with_adapter(reference_checkpoint, adapters["a2"])
    assert _texts(gateway.url, ["ft-a2"], PROMPTS[:1]) == [_expected_text(reference_checkpoint, reference, PROMPTS[0])]

    status, _ = _register(gateway.url, "ft-a2", adapters["a3"])
    assert status == 409  # the id is taken; the first registration stays
    status, _ = _register(gateway.url, "ft-removed", adapters["a3"])
    assert status == 201
    status, body = asyncio.run(_admin(gateway.url, "DELETE", "/v4/admin/adapters/ft-removed"))
    assert status == 200 and body["deleted"] is True
    assert "ft-removed" not in _store_entries(gateway.settings)
    status, body = asyncio.run(_admin(gateway.url, "DELETE", "/v4/admin/adapters/ft-removed"))
    assert status == 404


def test_a_custom_model_removed_while_its_request_waits_for_a_slot_is_a_404(
    gateway: RunningGateway, adapters: dict[str, Path]
) -> None:
    assert _register(gateway.url, "ft-race", adapters["a1"])[0] == 201

    async def race() -> None:
        registry = ModelRegistry.load(gateway.settings, EndpointDirectory())
        resolved = registry.resolve("ft-race")  # the request resolved its model and waits for a slot; meanwhile:
        assert (await _admin(gateway.url, "DELETE", "/v4/admin/adapters/ft-race"))[0] == 200
        plan = GenerationPlan(
            prompt="Hi", prompt_tokens=1, max_tokens=1, temperature=0.0, top_k=None, top_p=None,
            presence_penalty=0.0, frequency_penalty=0.0, stop_sequences=(), lora=resolved.lora,
        )  # fmt: skip
        endpoint = TritonEndpoint("127.0.0.1:9")  # never reached: the request ends before it is sent
        try:
            await _request_for(endpoint, resolved.base, "race", plan)
        finally:
            await endpoint.close()

    with pytest.raises(ModelNotFound, match="model 'ft-race' is not served here"):  # a 404, not a 500
        asyncio.run(race())


def test_requests_for_two_adapters_and_the_base_model_share_batches_and_each_equal_their_solo_result(
    gateway: RunningGateway, adapters: dict[str, Path]
) -> None:
    for custom_id, adapter in (("mix-1", adapters["a1"]), ("mix-2", adapters["a2"])):
        assert _register(gateway.url, custom_id, adapter)[0] == 201
    models = [("mix-1", "mix-2", MODEL)[i % 3] for i in range(8)]
    prompts = [VARIED_PROMPTS[i % 4] for i in range(8)]
    solo = {(m, p): _texts(gateway.url, [m], [p])[0] for m, p in set(zip(models, prompts, strict=True))}
    together = _texts(gateway.url, models, prompts)
    assert together == [solo[(m, p)] for m, p in zip(models, prompts, strict=True)]
    first, third = VARIED_PROMPTS[0], VARIED_PROMPTS[2]
    assert solo[("mix-1", first)] != solo[("mix-2", first)] and solo[(MODEL, third)] != solo[("mix-1", third)]


def test_weights_are_sent_once_and_again_after_the_server_evicted_them(
    gateway: RunningGateway, lora_triton: EmbeddedTriton, adapters: dict[str, Path]
) -> None:
    for custom_id, name in (("cache-1", "a1"), ("cache-2", "a2"), ("cache-3", "a3")):
        assert _register(gateway.url, custom_id, adapters[name])[0] == 201
    prompt = PROMPTS[0]

    def counters() -> tuple[float, float, float]:
        return (
            _lora_metric(lora_triton, "loads_total"),
            _lora_metric(lora_triton, "cache_misses_total"),
            (_lora_metric(lora_triton, "evictions_total")),
        )

    loads, misses, _ = counters()
    first = _texts(gateway.url, ["cache-3"], [prompt])[0]
    assert counters()[:2] == (loads + 1, misses)  # the first request carried the weights
    assert _texts(gateway.url, ["cache-3"], [prompt]) == [first]
    assert counters()[:2] == (loads + 1, misses)  # the second only the task id: the server had it
    # Two other adapters fill the two-adapter cache: cache-3, least recently used, is evicted.
    _texts(gateway.url, ["cache-1", "cache-2"], [prompt, prompt])
    loads, misses, evictions = counters()
    assert evictions >= 1 and _lora_metric(lora_triton, "adapters_cached") == CACHE_ADAPTERS
    # The gateway sends the task id alone, the server answers "not found in cache", the gateway resends the
    # weights: one miss, one load, and the same answer for the client.
    assert _texts(gateway.url, ["cache-3"], [prompt]) == [first]
    assert counters()[:2] == (loads + 1, misses + 1)


@pytest.mark.parametrize(
    ("case", "field", "message"),
    [
        ("another architecture", "adapter", "do not fit the base model"),
        ("rank above the maximum", "adapter", f"above the engine's maximum LoRA rank of {MAX_RANK}"),
        ("module not built", "adapter", "was not built with LoRA for"),
        ("not JSON", "adapter", "not valid JSON"),
        ("truncated weights", "adapter", "adapter_model.safetensors"),
        ("file missing", "adapter_model.safetensors", "missing"),
        ("bad id", "id", "must be 1-128 letters"),
        ("base id taken", "id", "is the id of a served base model"),
        ("unknown base", "base_model", "is not served here"),
    ],
)
def test_bad_adapters_are_refused_with_the_reason_and_leave_nothing_behind(
    gateway: RunningGateway, adapters: dict[str, Path], tiny_checkpoints: dict[TokenizerStyle, Path],
    tmp_path: Path, case: str, field: str, message: str,
) -> None:  # fmt: skip
    files, custom_id, base = _files(adapters["a1"]), "ft-bad", MODEL
    if case == "another architecture":
        files = _files(write_random_adapter(tiny_checkpoints[TokenizerStyle.BYTE_BPE], tmp_path / "tiny", seed=1))
    elif case == "rank above the maximum":
        files = _files(adapters["rank32"])
    elif case == "module not built":
        base = QV_MODEL
    elif case == "not JSON":
        files["adapter_config.json"] = b"{not json"
    elif case == "truncated weights":
        files["adapter_model.safetensors"] = files["adapter_model.safetensors"][:1000]
    elif case == "file missing":
        del files["adapter_model.safetensors"]
    elif case == "bad id":
        custom_id = "../escape"
    elif case == "base id taken":
        custom_id = MODEL
    elif case == "unknown base":
        base = "no-such-model"
    before = _store_entries(gateway.settings)
    status, body = asyncio.run(_upload(gateway.url, {"id": custom_id, "base_model": base}, files))
    assert status == 400, body
    assert body["error"]["param"] == field and message in body["error"]["message"], body
    assert _store_entries(gateway.settings) == before  # nothing half-registered, no upload left over
    assert not any(name.startswith(".") for name in before)


_BOUNDARY = "b0undary"


def _multipart(part_headers: str) -> bytes:
    return (f"--{_BOUNDARY}\r\n{part_headers}\r\n\r\nvalue\r\n--{_BOUNDARY}--\r\n").encode()


@pytest.mark.parametrize(
    ("case", "body"),
    [
        # What schemathesis found: a control character in a part's header line (was a 500).
        ("bad part header", _multipart('Content-Disposition: form-data; name="a\x1eb"')),
        (
            "unknown transfer encoding",
            _multipart('Content-Disposition: form-data; name="id"\r\nContent-Transfer-Encoding: rot13'),
        ),
        ("broken boundary", f"--{_BOUNDARY}\r\nContent-Disposition: form-data; name=id\r\n\r\nx\r\n--other--".encode()),
    ],
)
def test_malformed_multipart_bodies_are_a_400_naming_the_body(gateway: RunningGateway, case: str, body: bytes) -> None:
    async def post() -> tuple[int, Any]:
        headers = {"x-admin-key": ADMIN_KEY, "Content-Type": f"multipart/form-data; boundary={_BOUNDARY}"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{gateway.url}/v4/admin/adapters", data=body, headers=headers) as response,
        ):
            return response.status, await response.json()

    before = _store_entries(gateway.settings)
    status, answer = asyncio.run(post())
    assert status == 400, answer
    assert answer["error"]["param"] in {"multipart", "id"}, answer
    assert _store_entries(gateway.settings) == before


def test_the_command_line_refuses_bad_adapters_with_the_reason(config_file: Path, adapters: dict[str, Path]) -> None:
    run = _cli(config_file, "--base", MODEL, "--adapter", str(adapters["rank32"]), "--id", "cli-bad")
    assert run.returncode == 1 and f"maximum LoRA rank of {MAX_RANK}" in run.stderr
    run = _cli(config_file, "--base", QV_MODEL, "--adapter", str(adapters["a1"]), "--id", "cli-bad")
    assert run.returncode == 1 and "was not built with LoRA for" in run.stderr and "k_proj (attn_k)" in run.stderr


def test_unknown_custom_ids_and_missing_admin_keys_are_refused(gateway: RunningGateway) -> None:
    async def completion() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            return await _complete(session, gateway.url, "ft:never-registered", "Hello")

    status, body = asyncio.run(completion())
    assert status == 404 and body["error"]["param"] == "model"
    assert asyncio.run(_admin(gateway.url, "GET", "/v4/admin/adapters", key=None))[0] == 401
    assert asyncio.run(_admin(gateway.url, "GET", "/v4/admin/adapters", key="wrong"))[0] == 401


def test_usage_and_metrics_record_the_custom_model_id(gateway: RunningGateway, adapters: dict[str, Path]) -> None:
    assert _register(gateway.url, "ft-usage", adapters["a1"])[0] == 201
    _texts(gateway.url, ["ft-usage"], [PROMPTS[0]])

    async def read() -> tuple[str, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway.url}/metrics") as response:
                metrics = await response.text()
            async with session.get(f"{gateway.url}/v4/usage", params={"group_by": "model"}) as response:
                return metrics, await response.json()

    metrics, usage = asyncio.run(read())
    assert 'model="ft-usage"' in metrics
    rows = {row["model"]: row for row in usage["data"]}
    assert rows["ft-usage"]["completion_tokens"] == NEW_TOKENS
