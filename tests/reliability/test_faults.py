"""Faults injected into real processes: Triton killed mid-load and restarted, a model's Python stub crashed,
the gateway told to stop (SIGTERM) mid-load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from build_engines.repository import RepositorySettings, render_repository
from build_engines.tiny_checkpoints import TokenizerStyle
from gateway.settings import ModelEntry
from tests.gateway.conftest import MODEL, GatewayThread, gateway_settings, model_entry
from tests.sse import sse_events
from tests.triton_client import wait_for_metric
from triton_models.launcher import EmbeddedTriton


async def _stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any], started: asyncio.Event) -> dict:
    """Read one SSE stream to its end: {"final": last event | None, "error": error | None, "ended": time}."""
    result: dict[str, Any] = {"final": None, "error": None}
    async with session.post(f"{url}/v4/completions", json={**body, "stream": True}) as response:
        assert response.status == 200
        async for event, payload in sse_events(response):
            if event == "error":
                result["error"] = payload["error"]
            elif payload["completion"]["finish_reason"]:
                result["final"] = payload
            started.set()
    result["ended"] = time.monotonic()
    return result


async def _get(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(f"{url}/v4/completions", json=body) as response:
        return response.status, await response.json()


def test_triton_killed_mid_load_then_restarted(
    reference_checkpoint: Path, tmp_path: Path, report: dict[str, Any]
) -> None:
    repository = render_repository(RepositorySettings(checkpoint_dir=str(reference_checkpoint)), tmp_path / "repo")
    server = EmbeddedTriton(repository, log_path=tmp_path / "triton.log").start()
    settings = gateway_settings([model_entry(reference_checkpoint, server.grpc_url)], health_check_interval_s=0.25)
    body = {"model": MODEL, "prompt": "Once upon a time", "model_parameters": {"max_tokens": 300, "temperature": 0}}
    try:
        with GatewayThread(settings) as running:

            async def kill_mid_load() -> tuple[float, list[dict], tuple[int, Any]]:
                async with aiohttp.ClientSession() as session:
                    started = [asyncio.Event() for _ in range(16)]
                    streams = [asyncio.create_task(_stream(session, running.url, body, e)) for e in started]
                    plain = asyncio.create_task(_post(running.url, body))  # a non-streaming one in flight too
                    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
                    assert server.process is not None
                    os.killpg(server.process.pid, signal.SIGKILL)  # the server and its model processes
                    killed = time.monotonic()
                    return killed, list(await asyncio.gather(*streams)), await plain

            killed, results, plain = asyncio.run(kill_mid_load())
            ready_status, _ready = asyncio.run(_get(f"{running.url}/readyz"))
            health_status, _ = asyncio.run(_get(f"{running.url}/healthz"))
            refused_status, refused = asyncio.run(_post(running.url, body))

            server.stop()
            server = EmbeddedTriton(repository, ports=server.ports, log_path=tmp_path / "triton-2.log").start()
            back = time.monotonic()
            status = 0
            while time.monotonic() - back < 10:
                status, _answer = asyncio.run(_post(running.url, {**body, "model_parameters": {"max_tokens": 2}}))
                if status == 200:
                    break
                time.sleep(0.1)
            recovered_after = time.monotonic() - back
    finally:
        server.stop()

    errors = [r["error"] for r in results if r["error"] is not None]
    delays = [r["ended"] - killed for r in results]
    assert len(errors) == 16 and all(e["type"] == "service_unavailable" for e in errors)
    assert max(delays) < 1.0  # every open stream ends with an error event within a second
    assert plain[0] == 503
    assert ready_status == 503 and health_status == 200
    assert refused_status == 503 and "no inference server replica is ready" in refused["error"]["message"]
    for error in [*errors, plain[1]["error"], refused["error"]]:  # no internal addresses, no stack traces
        assert "127.0.0.1" not in json.dumps(error) and "Traceback" not in json.dumps(error)
    assert status == 200 and recovered_after < 5.0
    report.update({
        "check": "Triton SIGKILL mid-load, restarted", "faults injected": 1, "streams affected": 17,
        "errors seen by clients": f"{len(errors)} SSE error events (max {max(delays) * 1000:.0f} ms) + 1 x 503",
        "recovery": f"{recovered_after:.2f} s after Triton ready",
    })  # fmt: skip


def _stub_pid(server: EmbeddedTriton, model: str) -> int:
    """The Python-backend stub process that runs `model` for this server (found by its command line)."""
    assert server.process is not None
    marker = f"{server.repository.resolve()}/{model}/1/model.py"
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                arguments = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(argument.decode(errors="replace") == marker for argument in arguments):
                return int(entry.name)
    raise AssertionError(f"no stub process for {model}")


def _tiny_triton_for_stub_crashes(
    tiny_checkpoints: dict[TokenizerStyle, Path], tmp_path: Path
) -> tuple[EmbeddedTriton, ModelEntry]:
    """A started Triton on the tiny checkpoint, and the gateway's entry for it."""
    checkpoint = tiny_checkpoints[TokenizerStyle.BYTE_BPE]
    repository = render_repository(RepositorySettings(checkpoint_dir=str(checkpoint)), tmp_path / "repo")
    # A short unload timeout: a crashed stub never finishes unloading.
    server = EmbeddedTriton(repository, log_path=tmp_path / "triton.log", extra_args=("--exit-timeout-secs=2",))
    server.start()
    return server, model_entry(checkpoint, server.grpc_url)


def test_a_crashed_model_stub_is_detected_and_reported(
    tiny_checkpoints: dict[TokenizerStyle, Path], tmp_path: Path, report: dict[str, Any]
) -> None:
    server, entry = _tiny_triton_for_stub_crashes(tiny_checkpoints, tmp_path)
    body = {"model": MODEL, "prompt": "Hello", "model_parameters": {"max_tokens": 4}}
    try:
        with GatewayThread(gateway_settings([entry], health_check_interval_s=0.25)) as running:
            assert asyncio.run(_post(running.url, body))[0] == 200
            # Killed while idle: a stub killed in the middle of a shared-memory call can take tritonserver down
            # with it (boost::interprocess::lock_exception, seen under load), which is not what this tests.
            wait_for_metric(server.metrics_url, "cpu_llm_active_sequences", 0, timeout_s=5)
            time.sleep(0.2)
            os.kill(_stub_pid(server, "cpu_llm"), signal.SIGKILL)
            time.sleep(0.5)
            first_status, first = asyncio.run(_post(running.url, body))
            time.sleep(1.0)  # several health-check rounds: Triton still says "ready"; the gateway must not
            second_status, _second = asyncio.run(_post(running.url, body))
            ready_status, ready = asyncio.run(_get(f"{running.url}/readyz"))
            with urllib.request.urlopen(f"{server.http_url}/v2/models/cpu_llm/ready", timeout=5) as answer:
                triton_says_ready = answer.status == 200
    finally:
        server.stop(timeout_s=10)
    assert first_status == 503 and "crashed" in first["error"]["message"]
    assert "is not healthy" in first["error"]["message"]  # Triton's own words
    assert second_status == 503  # stays down although ModelReady says ready
    state = ready["replicas"][MODEL][entry.endpoints[0]]
    assert ready_status == 503 and state["ready"] is False and "not healthy" in state["error"]
    assert triton_says_ready  # which is why the gateway cannot trust ModelReady here
    report.update({
        "check": "cpu_llm stub SIGKILL (Triton still says ready)", "faults injected": 1, "streams affected": 1,
        "errors seen by clients": "503 naming the crash", "recovery": "replica held down until a probe succeeds",
    })  # fmt: skip


def test_a_model_stub_that_crashes_while_idle_shows_on_readyz_without_any_request(
    tiny_checkpoints: dict[TokenizerStyle, Path], tmp_path: Path, report: dict[str, Any]
) -> None:
    server, entry = _tiny_triton_for_stub_crashes(tiny_checkpoints, tmp_path)
    settings = gateway_settings([entry], health_check_interval_s=0.25, replica_probe_interval_s=1.0)
    try:
        with GatewayThread(settings) as running:
            assert asyncio.run(_get(f"{running.url}/readyz"))[0] == 200
            os.kill(_stub_pid(server, "cpu_llm"), signal.SIGKILL)
            killed = time.monotonic()
            while (status := asyncio.run(_get(f"{running.url}/readyz")))[0] == 200:
                assert time.monotonic() - killed < 15, "the crash stayed invisible"
                time.sleep(0.25)
            noticed_after = time.monotonic() - killed
    finally:
        server.stop(timeout_s=10)
    state = status[1]["replicas"][MODEL][entry.endpoints[0]]
    # Found by the probe: Triton's answer names the crash, or none comes.
    assert state["ready"] is False and ("not healthy" in state["error"] or "one-token request" in state["error"])
    report.update({
        "check": "cpu_llm stub SIGKILL while idle", "faults injected": 1, "streams affected": 0,
        "errors seen by clients": "0 (/readyz 503)", "recovery": f"noticed by the idle probe in {noticed_after:.1f} s",
    })  # fmt: skip


def test_sigterm_drains_in_flight_streams_and_records_their_usage(
    reference_triton: EmbeddedTriton, reference_checkpoint: Path, tmp_path: Path, report: dict[str, Any]
) -> None:
    import sqlite3

    from tests.gateway_process import model_table, serve, wait_ready, write_config
    from triton_models.launcher import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model = model_table(MODEL, reference_checkpoint, [reference_triton.grpc_url])
    config = write_config(tmp_path / "gateway.toml", port, tmp_path / "data", [model], drain_timeout_s=60)
    process = serve(config, stderr=subprocess.DEVNULL)
    body = {"model": MODEL, "prompt": "Once upon a time", "model_parameters": {"max_tokens": 48, "temperature": 0}}

    async def scenario() -> tuple[list[dict], tuple[int, Any], int]:
        async with aiohttp.ClientSession() as session:
            started = [asyncio.Event() for _ in range(4)]
            streams = [asyncio.create_task(_stream(session, url, body, e)) for e in started]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            refused = await _post(url, body)
            ready_status, _ = await _get(f"{url}/readyz")
            return list(await asyncio.gather(*streams)), refused, ready_status

    try:
        wait_ready(url, process, 30)
        results, refused, ready_status = asyncio.run(scenario())
        exit_code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert exit_code == 0
    assert refused[0] == 503 and "shutting down" in refused[1]["error"]["message"] and ready_status == 503
    assert [r["final"]["completion"]["finish_reason"] for r in results] == ["length"] * 4  # all finished
    with sqlite3.connect(tmp_path / "data" / "ledger.sqlite3") as ledger:
        rows = ledger.execute("SELECT status, completion_tokens FROM usage_records").fetchall()
    assert rows == [(200, 48)] * 4
    report.update({
        "check": "gateway SIGTERM mid-load (drain)", "faults injected": 1, "streams affected": 0,
        "errors seen by clients": "0 (new requests: 503)", "recovery": "exit 0 after 4 streams finished, 4 rows",
    })  # fmt: skip


def test_sigterm_cancels_what_outlasts_the_drain_timeout_and_exits_soon_after(
    reference_triton: EmbeddedTriton, reference_checkpoint: Path, tmp_path: Path, report: dict[str, Any]
) -> None:
    import sqlite3

    from gateway.app import CANCELLED_REQUESTS_GRACE_S
    from tests.gateway_process import model_table, serve, wait_ready, write_config
    from triton_models.launcher import free_port

    drain_s = 1.0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model = model_table(MODEL, reference_checkpoint, [reference_triton.grpc_url])
    config = write_config(tmp_path / "gateway.toml", port, tmp_path / "data", [model], drain_timeout_s=drain_s)
    process = serve(config, stderr=subprocess.DEVNULL)
    body = {"model": MODEL, "prompt": "Once upon a time", "model_parameters": {"max_tokens": 2000, "temperature": 0}}

    async def scenario() -> tuple[dict, float]:
        async with aiohttp.ClientSession() as session:
            started = asyncio.Event()
            stream = asyncio.create_task(_stream(session, url, body, started))  # minutes of generation
            await asyncio.wait_for(started.wait(), 60)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.to_thread(process.wait, 60)
            exited_after = time.monotonic() - signalled
            return await stream, exited_after

    try:
        wait_ready(url, process, 30)
        result, exited_after = asyncio.run(scenario())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    # The drain, the cancelled request's grace and the ledger's flush; aiohttp's own 60 s wait no longer adds up.
    assert exited_after < drain_s + CANCELLED_REQUESTS_GRACE_S + 5, exited_after
    assert result["final"] is None  # cut short, and told why: an error event, then the stream's proper end
    assert result["error"]["status"] == 503 and "shutting down" in result["error"]["message"]
    with sqlite3.connect(tmp_path / "data" / "ledger.sqlite3") as ledger:
        rows = ledger.execute("SELECT status, completion_tokens FROM usage_records").fetchall()
    assert len(rows) == 1 and rows[0][0] == 503 and 0 < rows[0][1] < 2000  # recorded, with the tokens it got
    report.update({
        "check": "gateway SIGTERM, a stream outlasting the drain", "faults injected": 1, "streams affected": 1,
        "errors seen by clients": "1 SSE error event (503)", "recovery": f"exit 0 {exited_after:.1f} s after SIGTERM",
    })  # fmt: skip
