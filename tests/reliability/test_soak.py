"""Soak: 64 concurrent streaming clients for --soak-seconds (60 in `make test`, 600 in `make reliability`), a mix
of parameters, every response checked, memory of the gateway and Triton measured at the start and the end."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.gateway.conftest import MODEL
from tests.gateway_process import model_table, serve, wait_ready, write_config
from tests.processes import descendants
from tests.prompts import VARIED_PROMPTS
from tests.sse import sse_events
from triton_models.launcher import EmbeddedTriton, free_port

CLIENTS = 64


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _process_group(leader: int) -> list[int]:
    """The Triton server and its model stub processes (below it)."""
    return [leader, *descendants(leader)]


@dataclass
class Tally:
    requests: int = 0
    failures: list[str] = field(default_factory=list)


def _requests(rng: random.Random) -> dict[str, Any]:
    """One request of the mix: greedy (checked against its known text) or sampled (checked for shape)."""
    prompt = rng.choice(VARIED_PROMPTS[:4])
    if rng.random() < 0.5:
        return {"prompt": prompt, "model_parameters": {"max_tokens": 16, "temperature": 0}}
    parameters: dict[str, Any] = {"max_tokens": rng.randint(4, 24), "temperature": rng.choice([0.3, 0.7, 1.0])}
    if rng.random() < 0.3:
        parameters["top_p"] = 0.9
    if rng.random() < 0.3:
        parameters["top_k"] = 20
    if rng.random() < 0.2:
        parameters["stop_sequences"] = ["\n"]
    return {"prompt": prompt, "model_parameters": parameters}


async def _stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    text, last = "", None
    async with session.post(f"{url}/v4/completions", json={"model": MODEL, "stream": True, **body}) as response:
        if response.status != 200:
            raise AssertionError(f"status {response.status}: {await response.text()}")
        async for event, payload in sse_events(response):
            if event == "error":
                raise AssertionError(f"error event: {payload}")
            text += payload["completion"]["text"]
            last = payload
    if last is None or last["completion"]["finish_reason"] is None:
        raise AssertionError("the stream ended without its final event (truncated)")
    return text, last


def test_soak(
    reference_triton: EmbeddedTriton, reference_checkpoint: Path, tmp_path: Path, request: pytest.FixtureRequest,
    report: dict[str, Any],
) -> None:  # fmt: skip
    seconds = float(request.config.getoption("--soak-seconds"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model = model_table(MODEL, reference_checkpoint, [reference_triton.grpc_url])
    gateway = serve(
        write_config(tmp_path / "gateway.toml", port, tmp_path / "data", [model]), stderr=subprocess.DEVNULL
    )
    assert reference_triton.process is not None
    triton_pids = _process_group(reference_triton.process.pid)
    tally = Tally()

    async def soak() -> dict[str, str]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=300)) as session:  # fmt: skip
            known: dict[str, str] = {}
            for prompt in VARIED_PROMPTS[:4]:  # greedy answers, once, before the load (and the memory baseline)
                body = {"prompt": prompt, "model_parameters": {"max_tokens": 16, "temperature": 0}}
                known[prompt] = (await _stream(session, url, body))[0]

            async def client(index: int, stop_at: float) -> None:
                rng = random.Random(index)
                while time.monotonic() < stop_at:
                    body = _requests(rng)
                    tally.requests += 1
                    try:
                        text, last = await _stream(session, url, body)
                        _check(body, text, last, known)
                    except Exception as error:  # every failure counted and reported, the soak goes on
                        tally.failures.append(f"{type(error).__name__}: {error}")

            # Warm-up at full concurrency (caches, batch buffers, connection pools), then the memory baseline.
            warm_until = time.monotonic() + min(10.0, seconds / 4)
            await asyncio.gather(*(client(1000 + i, warm_until) for i in range(CLIENTS)))
            baseline["gateway"], baseline["triton"] = _rss_mib([gateway.pid]), _rss_mib(triton_pids)
            stop_at = time.monotonic() + seconds
            await asyncio.gather(*(client(i, stop_at) for i in range(CLIENTS)))
            return known

    baseline: dict[str, float] = {}
    try:
        wait_ready(url, gateway, 30)
        asyncio.run(soak())
        end = {"gateway": _rss_mib([gateway.pid]), "triton": _rss_mib(triton_pids)}
    finally:
        gateway.terminate()
        gateway.wait(30)
    assert tally.requests > CLIENTS and not tally.failures, tally.failures[:5]
    assert end["gateway"] - baseline["gateway"] < 30, (baseline, end)  # flat, not growing with requests
    assert end["triton"] - baseline["triton"] < 100, (baseline, end)
    report.update({
        "check": f"soak: {CLIENTS} streaming clients, {seconds:g} s", "soak requests": tally.requests,
        "failures": len(tally.failures),
        "RSS start→end": f"gateway {baseline['gateway']:.0f}→{end['gateway']:.0f} MiB, "
        f"Triton {baseline['triton']:.0f}→{end['triton']:.0f} MiB",
    })  # fmt: skip


def _check(body: dict[str, Any], text: str, last: dict[str, Any], known: dict[str, str]) -> None:
    usage, parameters = last["token_usage"], body["model_parameters"]
    adds_up = usage["total"] == usage["prompt"] + usage["completion"]
    if not adds_up or not 0 < usage["completion"] <= parameters["max_tokens"]:
        raise AssertionError(f"usage does not add up: {usage}")
    if parameters["temperature"] == 0 and text != known[body["prompt"]]:
        raise AssertionError(f"greedy answer changed (mixed up?): {text!r} != {known[body['prompt']]!r}")
    if "\n" in parameters.get("stop_sequences", []) and "\n" in text:
        raise AssertionError("stop sequence in the text")
