"""The same ensemble driven four ways: through the gateway, through a minimal proxy (the floor: the gateway's
gRPC leg and SSE with nothing else), with tritonclient gRPC streaming, and with Triton's own HTTP
generate_stream; at 1, 8 and 32 concurrent streams, on SmolLM2 (cpu_llm) and on the echo generation model
(no model: isolates the cost of everything around generation).

The gateway and the proxy run in their own processes, as in production. Greedy, --max-tokens per request.
Each cell's requests run in --rounds rounds, the ways taking turns, so that the drift of a shared machine
hits every way alike. Prints requests/s, tokens/s, time to first token and inter-token latency (p50/p99)
side by side, with the throughput ratio to direct gRPC, and the CPU time each part used per request: the
front end (gateway or proxy), this benchmark's client, and Triton (server and model processes). Where the
machine is short of cores, CPU per request is what sets the ratios.

    make bench-gateway       # or: .venv/bin/python benchmarks/bench_gateway.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc.aio as grpcaio  # noqa: E402

from benchmarks.minimal_proxy import READY_LINE  # noqa: E402
from build_engines.reference_model import ensure_reference_checkpoint  # noqa: E402
from build_engines.repository import RepositorySettings, render_repository  # noqa: E402
from tests.gateway_process import model_table, start_logged  # noqa: E402
from tests.processes import cpu_seconds, tree_cpu_seconds  # noqa: E402
from tests.triton_client import infer_input  # noqa: E402
from triton_models import tensors as t  # noqa: E402
from triton_models.launcher import EmbeddedTriton, free_port  # noqa: E402

PROMPT = "Once upon a time, there was a little"


@dataclass
class Trace:
    start: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0


@dataclass
class Summary:
    requests_per_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def summarize(traces: list[Trace], elapsed: float) -> Summary:
    ttft = [(tr.arrivals[0] - tr.start) * 1000 for tr in traces if tr.arrivals]
    itl = [(b - a) * 1000 for tr in traces for a, b in zip(tr.arrivals, tr.arrivals[1:], strict=False)]
    return Summary(
        requests_per_s=len(traces) / elapsed,
        tokens_per_s=sum(tr.tokens for tr in traces) / elapsed,
        ttft_p50_ms=float(np.percentile(ttft, 50)),
        ttft_p99_ms=float(np.percentile(ttft, 99)),
        itl_p50_ms=float(np.percentile(itl, 50)) if itl else 0.0,
        itl_p99_ms=float(np.percentile(itl, 99)) if itl else 0.0,
    )


async def via_gateway(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int) -> Trace:
    body = {
        "model": model,
        "prompt": PROMPT,
        "stream": True,
        "model_parameters": {"temperature": 0, "max_tokens": max_tokens},
    }
    trace = Trace(time.perf_counter())
    async with session.post(f"{url}/v4/completions", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                if event["completion"]["text"]:
                    trace.arrivals.append(time.perf_counter())
                if event["token_usage"]:
                    trace.tokens = event["token_usage"]["completion"]
    return trace


async def via_generate_stream(session: aiohttp.ClientSession, url: str, max_tokens: int) -> Trace:
    body = {"text_input": PROMPT, "max_tokens": max_tokens, "stream": True, "top_k": 1}
    trace = Trace(time.perf_counter())
    async with session.post(f"{url}/v2/models/{t.ENSEMBLE}/generate_stream", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data: "):
                event = json.loads(line[6:])
                trace.arrivals.append(time.perf_counter())
                trace.tokens += int(np.sum(event.get(t.OUTPUT_TOKEN_COUNT, 0)))
    return trace


async def via_grpc(client: grpcaio.InferenceServerClient, max_tokens: int, request_id: str) -> Trace:
    inputs = [
        infer_input(t.TEXT_INPUT, np.array([PROMPT], dtype=object)),
        infer_input(t.MAX_TOKENS, np.int32(max_tokens)),
        infer_input(t.STREAM, np.bool_(True)),
        infer_input(t.TOP_K, np.int32(1)),
    ]

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": t.ENSEMBLE, "inputs": inputs, "request_id": request_id}

    trace = Trace(time.perf_counter())
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            raise RuntimeError(error)
        count = result.as_numpy(t.OUTPUT_TOKEN_COUNT)
        trace.arrivals.append(time.perf_counter())
        trace.tokens += int(count.sum())
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    return trace


async def drive(concurrency: int, per_client: int, one: Callable[[int], Awaitable[Trace]]) -> tuple[list[Trace], float]:
    """concurrency clients, each sending per_client requests one after another: (traces, seconds)."""
    traces: list[Trace] = []

    async def client(index: int) -> None:
        for round_ in range(per_client):
            traces.append(await one(index * 1000 + round_))

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return traces, time.perf_counter() - start


async def load(concurrency: int, per_client: int, one: Callable[[int], Awaitable[Trace]]) -> Summary:
    return summarize(*await drive(concurrency, per_client, one))


GATEWAY, PROXY, GRPC, GENERATE_STREAM = (
    "gateway (SSE)",
    "minimal proxy (SSE)",
    "tritonclient gRPC",
    "Triton generate_stream",
)
CPU_PARTS = ("front end", "client", "Triton")


@dataclass(frozen=True)
class Way:
    name: str
    one: Callable[[int], Awaitable[Trace]]
    front_end_pid: int | None  # the gateway's or the proxy's process; None when the client talks to Triton


@dataclass
class Cell:
    """One way at one concurrency, over all its rounds."""

    traces: list[Trace] = field(default_factory=list)
    seconds: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CPU_PARTS, 0.0))

    def cpu_ms_per_request(self, part: str) -> float:
        return 1000 * self.cpu_s[part] / len(self.traces)


def cpu_by_part(way: Way, triton_pid: int) -> dict[str, float]:
    times = os.times()
    return {
        "front end": cpu_seconds(way.front_end_pid) if way.front_end_pid is not None else 0.0,
        "client": times.user + times.system,  # this process: the benchmark's clients, all ways alike
        "Triton": tree_cpu_seconds(triton_pid),
    }


def start_gateway(
    workdir: Path, model_id: str, checkpoint: Path, server: EmbeddedTriton
) -> tuple[subprocess.Popen[bytes], str]:
    return start_logged(workdir, [model_table(model_id, checkpoint, [server.grpc_url], generation_model=model_id)])


def start_proxy(server: EmbeddedTriton) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.minimal_proxy", "--port", str(port), "--triton", server.grpc_url]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    if process.stdout.readline().strip() != READY_LINE:
        process.kill()
        raise RuntimeError(f"the minimal proxy did not start (exit code {process.wait()})")
    return process, f"http://127.0.0.1:{port}"


async def measure(
    model_id: str, server: EmbeddedTriton, fronts: dict[str, tuple[int, str]], args: argparse.Namespace
) -> list[tuple[str, int, str, Cell]]:
    """fronts: the gateway's and the proxy's (pid, url)."""
    assert server.process is not None
    rows = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        grpc_client = grpcaio.InferenceServerClient(server.grpc_url)

        def front_end(name: str) -> Way:
            pid, url = fronts[name]
            return Way(name, lambda i: via_gateway(session, url, model_id, args.max_tokens), pid)

        ways = [
            front_end(GATEWAY),
            front_end(PROXY),
            Way(GRPC, lambda i: via_grpc(grpc_client, args.max_tokens, f"bench-{i}-{time.perf_counter_ns()}"), None),
            Way(GENERATE_STREAM, lambda i: via_generate_stream(session, server.http_url, args.max_tokens), None),
        ]
        for concurrency in (1, 8, 32):
            per_client = max(1, args.requests // concurrency // args.rounds)
            cells = {way.name: Cell() for way in ways}
            for way in ways:
                await load(min(concurrency, 4), 1, way.one)  # warm-up
            for _ in range(args.rounds):
                for way in ways:
                    before = cpu_by_part(way, server.process.pid)
                    traces, seconds = await drive(concurrency, per_client, way.one)
                    after = cpu_by_part(way, server.process.pid)
                    cell = cells[way.name]
                    cell.traces += traces
                    cell.seconds += seconds
                    for part in CPU_PARTS:
                        cell.cpu_s[part] += after[part] - before[part]
            rows += [(model_id, concurrency, name, cell) for name, cell in cells.items()]
        await grpc_client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32, help="requests per way and concurrency level")
    parser.add_argument("--rounds", type=int, default=4, help="the ways take turns this many times per level")
    parser.add_argument(
        "--models", nargs="+", choices=[t.ECHO_LLM, t.CPU_LLM], default=[t.ECHO_LLM, t.CPU_LLM],
        help="generation models to drive (default: both)",
    )  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the SmolLM2 reference checkpoint")
    args = parser.parse_args()
    checkpoint = args.checkpoint or ensure_reference_checkpoint()
    rows: list[tuple[str, int, str, Cell]] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for model_id in args.models:
            settings = RepositorySettings(checkpoint_dir=str(checkpoint), generation_model=model_id)
            repository = render_repository(settings, workdir / f"repo-{model_id}")
            with EmbeddedTriton(repository, log_path=workdir / f"{model_id}.log") as server:
                gateway, gateway_url = start_gateway(workdir, model_id, checkpoint, server)
                proxy, proxy_url = start_proxy(server)
                try:
                    fronts = {GATEWAY: (gateway.pid, gateway_url), PROXY: (proxy.pid, proxy_url)}
                    rows += asyncio.run(measure(model_id, server, fronts, args))
                finally:
                    for process in (gateway, proxy):
                        process.terminate()
                        process.wait(30)
    print_tables(rows, args)


def print_tables(rows: list[tuple[str, int, str, Cell]], args: argparse.Namespace) -> None:
    print(
        f"\n{args.max_tokens} tokens per request, greedy, {args.requests} requests per cell (at least one per stream"
        f" per round) in {args.rounds} rounds,"
        f" {len(os.sched_getaffinity(0))} CPUs; generation model: echo_llm (no model) or cpu_llm (SmolLM2-135M);"
        " CPU: ms per request of the front end (gateway or proxy), the benchmark's client, and Triton\n"
    )
    print(
        "| model | streams | way | req/s | tokens/s | vs gRPC | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |"
        " CPU front end | CPU client | CPU Triton |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    summaries = {(model, streams, way): summarize(cell.traces, cell.seconds) for model, streams, way, cell in rows}
    for model_id, concurrency, way, cell in rows:
        s = summaries[model_id, concurrency, way]
        ratio = s.tokens_per_s / summaries[model_id, concurrency, GRPC].tokens_per_s
        cpu = " | ".join(f"{cell.cpu_ms_per_request(part):.2f}" for part in CPU_PARTS)
        print(
            f"| {model_id} | {concurrency} | {way} | {s.requests_per_s:.1f} | {s.tokens_per_s:.0f} | {ratio:.2f}x | "
            f"{s.ttft_p50_ms:.1f} | {s.ttft_p99_ms:.1f} | {s.itl_p50_ms:.2f} | {s.itl_p99_ms:.2f} | {cpu} |"
        )
    for model_id in args.models:
        for concurrency in (1, 8, 32):
            direct = summaries[model_id, concurrency, GRPC].ttft_p50_ms
            added = {way: summaries[model_id, concurrency, way].ttft_p50_ms - direct for way in (GATEWAY, PROXY)}
            print(
                f"{model_id} x{concurrency}: TTFT p50 over direct gRPC: gateway {added[GATEWAY]:+.2f} ms,"
                f" minimal proxy {added[PROXY]:+.2f} ms"
            )


if __name__ == "__main__":
    main()
