"""Several real Triton replicas behind one gateway: balancing, a replica killed mid-load, and its return."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from build_engines.repository import RepositorySettings, render_repository
from gateway.replicas import EndpointDirectory, ReplicaPool
from gateway.triton_translation import GenerationPlan, ensemble_request
from tests.gateway.conftest import MODEL, GatewayThread, RunningGateway, gateway_settings, model_entry
from tests.prompts import VARIED_PROMPTS
from tests.sse import sse_events
from tests.triton_client import metric_value, wait_for_metric
from triton_models.launcher import EmbeddedTriton

SUCCESSES = 'nv_inference_request_success{model="ensemble"'


@pytest.fixture(scope="module")
def repository(reference_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("replicas")
    return render_repository(RepositorySettings(checkpoint_dir=str(reference_checkpoint)), root / "repository")


@pytest.fixture
def two_replicas(repository: Path, tmp_path: Path) -> Iterator[list[EmbeddedTriton]]:
    servers = [EmbeddedTriton(repository, log_path=tmp_path / f"triton-{i}.log").start() for i in range(2)]
    yield servers
    for server in servers:
        server.stop()


def _gateway(checkpoint: Path, servers: list[EmbeddedTriton]) -> GatewayThread:
    entry = model_entry(checkpoint, servers[0].grpc_url).model_copy(update={"endpoints": [s.grpc_url for s in servers]})
    return GatewayThread(gateway_settings([entry], health_check_interval_s=0.25))


async def _readyz(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/readyz") as response:
        return response.status, await response.json()


async def _complete(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> tuple[int, Any]:
    body = {"model": MODEL, "prompt": prompt, "model_parameters": {"max_tokens": max_tokens, "temperature": 0}}
    async with session.post(f"{url}/v4/completions", json=body) as response:
        return response.status, await response.json()


def test_streams_are_balanced_across_replicas(reference_checkpoint: Path, two_replicas: list[EmbeddedTriton]) -> None:
    before = [metric_value(s.metrics_url, SUCCESSES) for s in two_replicas]
    with _gateway(reference_checkpoint, two_replicas) as running:

        async def run() -> list[tuple[int, Any]]:
            async with aiohttp.ClientSession() as session:
                calls = [_complete(session, running.url, VARIED_PROMPTS[i % 4], 8) for i in range(8)]
                return await asyncio.gather(*calls)

        results = asyncio.run(run())
    assert [status for status, _ in results] == [200] * 8
    served = _served(two_replicas, before, total=8)
    assert served == [4, 4]  # 8 concurrent requests, least outstanding first: half each


def test_clients_that_leave_are_stopped_on_the_replica_that_runs_them(
    reference_checkpoint: Path, two_replicas: list[EmbeddedTriton]
) -> None:
    with _gateway(reference_checkpoint, two_replicas) as running:

        async def leave_after_first_event() -> None:
            streams = [_Stream() for _ in range(4)]
            async with aiohttp.ClientSession() as session:
                tasks = [asyncio.create_task(s.run(session, running.url, VARIED_PROMPTS[1], 400)) for s in streams]
                await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in streams)), 60)
                _, state = await _readyz(running.url)
                assert [r["in_flight"] for r in state["replicas"][MODEL].values()] == [2, 2]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(leave_after_first_event())
        for server in two_replicas:
            wait_for_metric(server.metrics_url, "cpu_llm_active_sequences", 0, timeout_s=2.0)


class _Stream:
    """One streaming request, recording its text, its final event or its error, and when it ended."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.prompt = ""
        self.text = ""
        self.final: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.ended_at = 0.0

    async def run(self, session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> None:
        self.prompt = prompt
        parameters = {"max_tokens": max_tokens, "temperature": 0}
        body = {"model": MODEL, "prompt": prompt, "stream": True, "model_parameters": parameters}
        async with session.post(f"{url}/v4/completions", json=body) as response:
            assert response.status == 200
            event = None
            async for line in response.content:
                if line.startswith(b"event: "):
                    event = line[len(b"event: ") :].strip().decode()
                elif line.startswith(b"data: "):
                    payload = json.loads(line[len(b"data: ") :])
                    if event == "error":
                        self.error = payload["error"]
                    elif payload["completion"]["finish_reason"] is not None:
                        self.final = payload
                    else:
                        self.text += payload["completion"]["text"]
                    self.started.set()
        self.ended_at = time.monotonic()


def test_a_replica_killed_mid_load_fails_only_its_own_streams_and_comes_back(
    reference_checkpoint: Path, two_replicas: list[EmbeddedTriton]
) -> None:
    victim, survivor = two_replicas
    with _gateway(reference_checkpoint, two_replicas) as running:
        streams = [_Stream() for _ in range(16)]

        async def kill_mid_load() -> tuple[float, dict[str, Any], list[tuple[int, Any]]]:
            async with aiohttp.ClientSession() as session:
                tasks = [
                    asyncio.create_task(s.run(session, running.url, VARIED_PROMPTS[i % 4], 200))
                    for i, s in enumerate(streams)
                ]
                await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in streams)), 60)
                _, before = await _readyz(running.url)
                assert victim.process is not None
                # The whole process group, as when a container or node dies: the Python-backend stubs go too.
                os.killpg(victim.process.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                # New requests right after the kill, before any health check ran, still succeed.
                after_kill = await asyncio.gather(*(_complete(session, running.url, "Hello", 4) for _ in range(4)))
                await asyncio.wait_for(asyncio.gather(*tasks), 120)
                return killed_at, before, after_kill

        killed_at, before, after_kill = asyncio.run(kill_mid_load())
        on_victim = before["replicas"][MODEL][victim.grpc_url]["in_flight"]
        failed = [s for s in streams if s.error is not None]
        completed = [s for s in streams if s.final is not None]
        assert on_victim == 8 and len(failed) == 8 and len(completed) == 8
        for stream in failed:
            assert stream.error is not None and stream.error["type"] == "service_unavailable"
            assert stream.error["message"] == "the inference server became unreachable"
            assert victim.grpc_url not in json.dumps(stream.error)  # no internal addresses for clients
            assert stream.ended_at - killed_at < 1.0
        texts: dict[str, set[str]] = {}
        for stream in completed:
            assert stream.final is not None and stream.final["token_usage"]["completion"] > 0 and stream.text
            texts.setdefault(stream.prompt, set()).add(stream.text)
        assert all(len(variants) == 1 for variants in texts.values())  # greedy: one answer per prompt, no mix-ups
        assert [status for status, _ in after_kill] == [200] * 4

        status, ready = asyncio.run(_readyz(running.url))
        assert status == 200  # one replica is enough to be ready
        assert ready["replicas"][MODEL][victim.grpc_url]["ready"] is False
        assert ready["replicas"][MODEL][survivor.grpc_url]["ready"] is True

        victim.stop()
        revived = EmbeddedTriton(victim.repository, ports=victim.ports, log_path=victim.log_path).start()
        two_replicas[0] = revived
        revived_at = time.monotonic()
        _wait_until_replica_ready(running, revived.grpc_url, timeout_s=5.0)
        assert time.monotonic() - revived_at < 5.0

        async def spread() -> list[tuple[int, Any]]:
            async with aiohttp.ClientSession() as session:
                return await asyncio.gather(*(_complete(session, running.url, "Hello", 4) for _ in range(4)))

        assert [status for status, _ in asyncio.run(spread())] == [200] * 4
        assert _served([revived], [0.0], total=2) == [2]  # it takes its share again


def _served(servers: list[EmbeddedTriton], before: list[float], total: int) -> list[float]:
    """Requests each server counted since `before`, once they add up to total (Triton counts a decoupled
    request a moment after its final response went out)."""
    deadline = time.monotonic() + 5.0
    while True:
        served = [metric_value(s.metrics_url, SUCCESSES) - b for s, b in zip(servers, before, strict=True)]
        if sum(served) >= total or time.monotonic() > deadline:
            return served
        time.sleep(0.05)


def _wait_until_replica_ready(running: RunningGateway, address: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        _, body = asyncio.run(_readyz(running.url))
        if body["replicas"][MODEL][address]["ready"]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"replica {address} not ready after {timeout_s} s: {body}")
        time.sleep(0.1)


def test_streams_on_a_replica_that_stops_answering_are_cut_not_left_hanging(
    reference_checkpoint: Path, two_replicas: list[EmbeddedTriton]
) -> None:
    entry = model_entry(reference_checkpoint, two_replicas[0].grpc_url).model_copy(
        update={"endpoints": [s.grpc_url for s in two_replicas]}
    )
    settings = gateway_settings(
        [entry], health_check_interval_s=0.25, readiness_timeout_s=0.5, replica_stall_timeout_s=1.0
    )
    frozen = two_replicas[0].process
    assert frozen is not None
    body = {"model": MODEL, "prompt": VARIED_PROMPTS[0], "stream": True,
            "model_parameters": {"max_tokens": 300, "temperature": 0}}  # fmt: skip

    async def stream(session: aiohttp.ClientSession, url: str, started: asyncio.Event) -> tuple[str, float]:
        async with session.post(f"{url}/v4/completions", json=body) as response:
            async for event, payload in sse_events(response):
                started.set()
                if event == "error":
                    return payload["error"]["message"], time.monotonic()
                if payload["completion"]["finish_reason"]:
                    return "finished", time.monotonic()
        return "cut without an event", time.monotonic()

    async def run(url: str) -> tuple[list[tuple[str, float]], float]:
        async with aiohttp.ClientSession() as session:
            started = [asyncio.Event() for _ in range(4)]
            streams = [asyncio.create_task(stream(session, url, e)) for e in started]  # two on each replica
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            os.kill(frozen.pid, signal.SIGSTOP)  # Triton stops answering, its connections stay open
            stopped = time.monotonic()
            return await asyncio.wait_for(asyncio.gather(*streams), 120), stopped

    try:
        with GatewayThread(settings) as running:
            results, stopped = asyncio.run(run(running.url))
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    cut = [(text, at - stopped) for text, at in results if "stopped answering" in text]
    assert len(cut) == 2, results  # the frozen replica's two streams: told, within seconds (gRPC took minutes)
    assert all(after < 10 for _, after in cut), cut
    assert [text for text, _ in results].count("finished") == 2  # the other replica's streams are untouched


def test_a_new_stream_on_a_replica_idle_for_long_is_not_stalled_nor_a_busy_replica_probed(
    reference_checkpoint: Path, reference_triton: EmbeddedTriton
) -> None:
    entry = model_entry(reference_checkpoint, reference_triton.grpc_url)
    plan = GenerationPlan(
        prompt=VARIED_PROMPTS[0], prompt_tokens=8, max_tokens=200, temperature=0.0, top_k=None, top_p=None,
        presence_penalty=0.0, frequency_penalty=0.0, stop_sequences=(),
    )  # fmt: skip

    async def run() -> tuple[bool, int, bool]:
        directory = EndpointDirectory()
        pool = ReplicaPool(entry, directory, probe_interval_s=0.1)
        (replica,) = pool.replicas.values()
        endpoint = replica.endpoint
        probes = 0
        real_probe = endpoint.probe

        async def counted_probe(ensemble: str, timeout_s: float) -> tuple[bool, str | None]:
            nonlocal probes
            probes += 1
            return await real_probe(ensemble, timeout_s)

        endpoint.probe = counted_probe  # type: ignore[method-assign]  # a spy: the real probe still runs
        await asyncio.sleep(0.5)  # idle for longer than the quiet time below
        generation = endpoint.stream(ensemble_request(entry.ensemble, "long-one", plan))
        first = asyncio.ensure_future(anext(generation))
        await asyncio.sleep(0)  # the stream is open, nothing received yet
        stalled = endpoint.stalled(0.3)
        replica.probed_at = 0.0  # a periodic probe is long due, and the last one failed
        await pool.check(5.0)  # ... but the replica is busy: no probe
        busy_probes = probes
        await first
        await generation.aclose()
        await directory.close()
        return stalled, busy_probes, replica.ready is True

    stalled, busy_probes, ready = asyncio.run(run())
    assert not stalled  # quiet time counts from the stream's opening, not from the endpoint's last message
    assert busy_probes == 0 and ready


def test_dns_discovery_finds_the_replicas_behind_a_name(
    reference_checkpoint: Path, reference_triton: EmbeddedTriton
) -> None:
    """As with a Kubernetes headless service: one name, one replica per address it resolves to."""
    port = reference_triton.grpc_url.rsplit(":", 1)[1]
    entry = model_entry(reference_checkpoint, f"localhost:{port}").model_copy(update={"discovery": "dns"})
    with GatewayThread(gateway_settings([entry], dns_refresh_s=0.5)) as running:

        async def run() -> tuple[tuple[int, Any], tuple[int, Any]]:
            async with aiohttp.ClientSession() as session:
                answer = await _complete(session, running.url, "Hello", 4)
            return answer, await _readyz(running.url)

        (status, _), (ready_status, ready) = asyncio.run(run())
    assert status == 200 and ready_status == 200
    assert f"127.0.0.1:{port}" in ready["replicas"][MODEL]
    # Whatever else "localhost" resolves to (::1 here, where Triton does not listen) is tried and marked down.
    replicas = ready["replicas"][MODEL]
    assert all(state["ready"] == (address == f"127.0.0.1:{port}") for address, state in replicas.items())


def test_a_failed_dns_lookup_keeps_the_replicas_it_found_before(reference_checkpoint: Path) -> None:
    entry = model_entry(reference_checkpoint, "localhost:8001").model_copy(update={"discovery": "dns"})

    async def run() -> tuple[set[str], set[str]]:
        directory = EndpointDirectory()
        pool = ReplicaPool(entry, directory)
        try:
            await pool.discover()
            found = set(pool.replicas)
            loop = asyncio.get_running_loop()

            async def failing(*_: object, **__: object) -> None:
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

            loop.getaddrinfo = failing  # type: ignore[method-assign,assignment]  # a DNS outage, injected
            await pool.discover()
            return found, set(pool.replicas)
        finally:
            await directory.close()

    found, after_failure = asyncio.run(run())
    assert "127.0.0.1:8001" in found and after_failure == found


def _moving_dns(loop: asyncio.AbstractEventLoop) -> None:
    """A name whose one address changes at every lookup (pods replaced one after another), injected."""
    lookups = iter(range(2, 250))

    async def resolve(host: str, port: int, **_: object) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"127.0.0.{next(lookups)}", port))]

    loop.getaddrinfo = resolve  # type: ignore[method-assign,assignment]


def test_replicas_that_left_dns_leave_no_channel_and_no_metric_series(reference_checkpoint: Path) -> None:
    entry = model_entry(reference_checkpoint, "triton.example:8001").model_copy(update={"discovery": "dns"})

    async def churn() -> tuple[set[str], set[str]]:
        _moving_dns(asyncio.get_running_loop())
        directory = EndpointDirectory()
        pool = ReplicaPool(entry, directory)
        try:
            for _ in range(5):
                await pool.discover()
                await directory.close_unused(set(pool.replicas))
            return directory.addresses, set(pool.replicas)
        finally:
            await directory.close()

    channels, replicas = asyncio.run(churn())
    assert channels == replicas and len(replicas) == 1  # not one channel per address ever seen

    with GatewayThread(gateway_settings([entry], dns_refresh_s=0.1, health_check_interval_s=0.1)) as running:
        running.loop.call_soon_threadsafe(_moving_dns, running.loop)
        time.sleep(1.5)  # a dozen lookups, each a new address

        async def series() -> list[str]:
            async with aiohttp.ClientSession() as session, session.get(f"{running.url}/metrics") as response:
                text = await response.text()
            return [line for line in text.splitlines() if line.startswith("gateway_triton_replica_ready{")]

        ready_series = asyncio.run(series())
    assert len(ready_series) == 1, ready_series


def test_a_health_check_in_flight_does_not_undo_a_replica_marked_down(
    reference_checkpoint: Path, reference_triton: EmbeddedTriton
) -> None:
    # The check's answer ("ready") was asked before a request found the replica failed: it must not win.
    entry = model_entry(reference_checkpoint, reference_triton.grpc_url)

    async def run() -> tuple[bool | None, bool | None]:
        directory = EndpointDirectory()
        pool = ReplicaPool(entry, directory)
        try:
            check = asyncio.create_task(pool.check(5.0))
            await asyncio.sleep(0)  # the check is now waiting for Triton's answer
            pool.mark_down(reference_triton.grpc_url, "a stream failed")
            await check
            after_race = pool.replicas[reference_triton.grpc_url].ready
            await pool.check(5.0)  # the next check sees the replica as it is
            return after_race, pool.replicas[reference_triton.grpc_url].ready
        finally:
            await directory.close()

    assert asyncio.run(run()) == (False, True)
