"""Bad clients: hundreds that vanish mid-generation, one that stops reading, deadlines they ask for, and what
the logs and error bodies must never show."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from build_engines.repository import RepositorySettings, render_repository
from build_engines.tiny_checkpoints import TokenizerStyle, write_tiny_checkpoint
from gateway.auth import hash_key
from gateway.settings import ApiKey
from tests.gateway.conftest import MODEL, GatewayThread, RunningGateway, gateway_settings, model_entry
from tests.triton_client import metric_value, wait_for_metric
from triton_models.launcher import EmbeddedTriton


def _open_fds() -> dict[str, str]:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return fds


def _gateway_tasks(running: RunningGateway) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks())

    return asyncio.run_coroutine_threadsafe(count(), running.loop).result(timeout=10) - 1  # not this one


def test_two_hundred_clients_that_drop_at_random_leave_nothing_behind(
    reference_triton: EmbeddedTriton, reference_checkpoint: Path, report: dict[str, Any]
) -> None:
    settings = gateway_settings([model_entry(reference_checkpoint, reference_triton.grpc_url)])
    with GatewayThread(settings) as running:
        warm = asyncio.run(_drop_at_random(running.url, 4, seed=1))  # channels and pools exist before counting
        assert warm >= 0
        wait_for_metric(reference_triton.metrics_url, "cpu_llm_active_sequences", 0, timeout_s=10)
        time.sleep(1.0)  # the usage ledger has written (and opened its database file)
        fds, tasks = _open_fds(), _gateway_tasks(running)
        completed = asyncio.run(_drop_at_random(running.url, 200, seed=7))
        wait_for_metric(reference_triton.metrics_url, "cpu_llm_active_sequences", 0, timeout_s=15)
        time.sleep(0.5)
        fds_after, tasks_after = _open_fds(), _gateway_tasks(running)
        queued = metric_value(reference_triton.metrics_url, "cpu_llm_queued_requests")
    assert queued == 0
    assert tasks_after <= tasks  # no task left behind (stop requests included)
    new = {fd: target for fd, target in fds_after.items() if fds.get(fd) != target}
    assert len(fds_after) <= len(fds), new  # no connection or stream left open
    report.update({
        "check": "200 clients dropping at random", "faults injected": 200 - completed, "streams affected": 200,
        "errors seen by clients": "n/a (they left)",
        "recovery": f"active sequences 0; tasks {tasks}→{tasks_after}; fds {len(fds)}→{len(fds_after)}",
    })  # fmt: skip


async def _drop_at_random(url: str, clients: int, seed: int) -> int:
    """`clients` requests (half streaming) each abandoned after a random moment; returns how many finished first."""
    rng = random.Random(seed)
    finished = 0

    async def one(session: aiohttp.ClientSession, stream: bool, max_tokens: int) -> None:
        nonlocal finished
        body = {"model": MODEL, "prompt": "Tell me a story", "stream": stream,
                "model_parameters": {"max_tokens": max_tokens}}  # fmt: skip
        async with session.post(f"{url}/v4/completions", json=body) as response:
            await response.read()
        finished += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        for index in range(clients):
            task = asyncio.create_task(one(session, index % 2 == 0, rng.randint(8, 64)))
            asyncio.get_running_loop().call_later(rng.uniform(0.05, 2.0), task.cancel)
            tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)
    return finished


@pytest.fixture(scope="module")
def long_context_tiny_triton(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny model (fast) with an 8192-token context, so one stream can produce a lot of text quickly."""
    root = tmp_path_factory.mktemp("tiny-long")
    checkpoint = write_tiny_checkpoint(root / "ck", TokenizerStyle.BYTE_BPE, context_length=8192)
    repository = render_repository(RepositorySettings(checkpoint_dir=str(checkpoint)), root / "repo")
    server = EmbeddedTriton(repository, log_path=root / "triton.log").start()
    yield server, checkpoint
    server.stop()


def test_a_client_that_stops_reading_is_cut_off_and_its_generation_stopped(
    long_context_tiny_triton: Any, report: dict[str, Any]
) -> None:
    server, checkpoint = long_context_tiny_triton
    settings = gateway_settings([model_entry(checkpoint, server.grpc_url)], slow_client_timeout_s=1.0,
                                stream_send_buffer_bytes=16384)  # fmt: skip
    with GatewayThread(settings) as running:
        body = json.dumps({"model": MODEL, "prompt": "a", "stream": True,
                           "model_parameters": {"max_tokens": 8000, "temperature": 1.0}}).encode()  # fmt: skip
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        client.connect((settings.host, settings.port))
        client.sendall(
            b"POST /v4/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        started = time.monotonic()
        try:
            wait_for_metric(server.metrics_url, "cpu_llm_active_sequences", 1, timeout_s=10)
            # The client reads nothing: the gateway must give up on it and stop the generation.
            wait_for_metric(server.metrics_url, "cpu_llm_active_sequences", 0, timeout_s=30)
            cut_after = time.monotonic() - started
            generated = metric_value(server.metrics_url, "cpu_llm_generated_tokens_total")
            client.setblocking(False)
            received = 0
            try:
                while chunk := client.recv(1 << 16):
                    received += len(chunk)
            except BlockingIOError:
                pass
            except ConnectionResetError:
                pass
        finally:
            client.close()
        # The handler finishes its teardown (the stop request, the usage row) just after the engine let go.
        deadline = time.monotonic() + 5.0
        while (in_flight := _gauge(running.url, "gateway_requests_in_flight")) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert generated < 8000  # stopped long before the end
    assert in_flight == 0
    report.update({
        "check": "a client that stops reading", "faults injected": 1, "streams affected": 1,
        "errors seen by clients": "connection cut", "recovery": f"generation stopped after {cut_after:.1f} s, "
        f"{int(generated)} of 8000 tokens; buffered ≤ {received // 1024} KiB at the client",
    })  # fmt: skip


def _gauge(url: str, name: str) -> float:
    async def fetch() -> str:
        async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
            return await response.text()

    lines = [line for line in asyncio.run(fetch()).splitlines() if line.startswith(name)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_clients_ask_for_their_own_deadline_which_the_server_caps(
    reference_triton: EmbeddedTriton, reference_checkpoint: Path
) -> None:
    settings = gateway_settings([model_entry(reference_checkpoint, reference_triton.grpc_url)], request_timeout_s=1.0)
    body = {"model": MODEL, "prompt": "Once upon a time, there was a little",
            "model_parameters": {"max_tokens": 500, "temperature": 0}}  # fmt: skip

    async def call(timeout: str) -> tuple[int, Any, float]:
        started = time.monotonic()
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{running.url}/v4/completions", json=body, headers={"x-request-timeout": timeout}
            ) as response,
        ):
            return response.status, await response.json(), time.monotonic() - started

    with GatewayThread(settings) as running:
        short = asyncio.run(call("0.3"))
        capped = asyncio.run(call("1000"))
        bad = asyncio.run(call("soon"))
    assert short[0] == 504 and "0.3 s" in short[1]["error"]["message"] and short[2] < 0.9
    assert capped[0] == 504 and "1 s" in capped[1]["error"]["message"] and capped[2] < 2.5
    assert bad[0] == 400 and bad[1]["error"]["param"] == "x-request-timeout"


def test_api_keys_never_reach_the_logs_and_errors_hold_no_internals(
    reference_triton: EmbeddedTriton, reference_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret, wrong = "sk-live-5f1b0c9e2d", "sk-wrong-77aa10"
    keys = [ApiKey(id="team", sha256=hash_key(secret), accounts=["*"])]
    dead = model_entry(reference_checkpoint, "127.0.0.1:1").model_copy(update={"id": "dead"})
    live = model_entry(reference_checkpoint, reference_triton.grpc_url)
    settings = gateway_settings([live, dead], api_keys=keys)
    bodies = []
    with caplog.at_level(logging.DEBUG), GatewayThread(settings) as running:

        async def calls() -> None:
            async with aiohttp.ClientSession() as session:
                for key, model in [(secret, MODEL), (wrong, MODEL), (secret, "dead"), (secret, "nope")]:
                    body = {"model": model, "prompt": "hi", "model_parameters": {"max_tokens": 2}}
                    async with session.post(f"{running.url}/v4/completions", json=body,
                                            headers={"x-api-key": key}) as response:  # fmt: skip
                        bodies.append(await response.text())

        asyncio.run(calls())
    logged = "\n".join(record.getMessage() + json.dumps(vars(record), default=str) for record in caplog.records)
    assert secret not in logged and wrong not in logged
    for text in bodies[1:]:
        assert secret not in text and wrong not in text and "127.0.0.1" not in text and "Traceback" not in text
    assert [json.loads(b)["error"]["status"] for b in bodies[1:]] == [401, 503, 404]
