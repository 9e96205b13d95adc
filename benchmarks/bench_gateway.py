"""The same ensemble driven three ways: through the gateway, with tritonclient gRPC streaming, and with
Triton's own HTTP generate_stream; at 1, 8 and 32 concurrent streams, on SmolLM2 (cpu_llm) and on the
echo generation model (no model: isolates the cost of everything around generation).

The gateway runs in its own process, as in production. Greedy, --max-tokens per request. Prints
requests/s, tokens/s, time to first token and inter-token latency (p50/p99) side by side, with the
gateway's throughput ratio and its added TTFT against direct gRPC.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc.aio as grpcaio  # noqa: E402

from build_engines.reference_model import ensure_reference_checkpoint  # noqa: E402
from build_engines.repository import RepositorySettings, render_repository  # noqa: E402
from tests.gateway_process import model_table, start_logged  # noqa: E402
from tests.triton_client import infer_input  # noqa: E402
from triton_models import tensors as t  # noqa: E402
from triton_models.launcher import EmbeddedTriton  # noqa: E402

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

    async def requests():  # type: ignore[no-untyped-def]
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


async def load(concurrency: int, per_client: int, one: Callable[[int], Awaitable[Trace]]) -> Summary:
    traces: list[Trace] = []

    async def client(index: int) -> None:
        for round_ in range(per_client):
            traces.append(await one(index * 1000 + round_))

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return summarize(traces, time.perf_counter() - start)


def start_gateway(
    workdir: Path, model_id: str, checkpoint: Path, server: EmbeddedTriton
) -> tuple[subprocess.Popen[bytes], str]:
    return start_logged(workdir, [model_table(model_id, checkpoint, [server.grpc_url], generation_model=model_id)])


async def measure(model_id: str, server: EmbeddedTriton, gateway_url: str, args: argparse.Namespace) -> list[tuple]:
    rows = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        grpc_client = grpcaio.InferenceServerClient(server.grpc_url)
        ways: dict[str, Callable[[int], Awaitable[Trace]]] = {
            "gateway (SSE)": lambda i: via_gateway(session, gateway_url, model_id, args.max_tokens),
            "tritonclient gRPC": lambda i: via_grpc(
                grpc_client, args.max_tokens, f"bench-{i}-{time.perf_counter_ns()}"
            ),
            "Triton generate_stream": lambda i: via_generate_stream(session, server.http_url, args.max_tokens),
        }
        for concurrency in (1, 8, 32):
            per_client = max(1, args.requests // concurrency)
            for way, one in ways.items():
                await load(min(concurrency, 4), 1, one)  # warm-up
                rows.append((model_id, concurrency, way, await load(concurrency, per_client, one)))
        await grpc_client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32, help="requests per way and concurrency level")
    parser.add_argument(
        "--models", nargs="+", choices=[t.ECHO_LLM, t.CPU_LLM], default=[t.ECHO_LLM, t.CPU_LLM],
        help="generation models to drive (default: both)",
    )  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the SmolLM2 reference checkpoint")
    args = parser.parse_args()
    checkpoint = args.checkpoint or ensure_reference_checkpoint()
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for model_id in args.models:
            settings = RepositorySettings(checkpoint_dir=str(checkpoint), generation_model=model_id)
            repository = render_repository(settings, workdir / f"repo-{model_id}")
            with EmbeddedTriton(repository, log_path=workdir / f"{model_id}.log") as server:
                gateway, url = start_gateway(workdir, model_id, checkpoint, server)
                try:
                    rows += asyncio.run(measure(model_id, server, url, args))
                finally:
                    gateway.terminate()
                    gateway.wait(30)
    print(
        f"\n{args.max_tokens} tokens per request, greedy, {args.requests} requests per cell,"
        f" {len(os.sched_getaffinity(0))} CPUs; generation model: echo_llm (no model) or cpu_llm (SmolLM2-135M)\n"
    )
    print(
        "| model | streams | way | req/s | tokens/s | vs gRPC | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for model_id, concurrency, way, s in rows:
        direct = next(r[3] for r in rows if r[0] == model_id and r[1] == concurrency and r[2] == "tritonclient gRPC")
        ratio = s.tokens_per_s / direct.tokens_per_s
        print(
            f"| {model_id} | {concurrency} | {way} | {s.requests_per_s:.1f} | {s.tokens_per_s:.0f} | {ratio:.2f}x | "
            f"{s.ttft_p50_ms:.1f} | {s.ttft_p99_ms:.1f} | {s.itl_p50_ms:.2f} | {s.itl_p99_ms:.2f} |"
        )
    for model_id in args.models:
        for concurrency in (1, 8, 32):
            cell = {r[2]: r[3] for r in rows if r[0] == model_id and r[1] == concurrency}
            added = cell["gateway (SSE)"].ttft_p50_ms - cell["tritonclient gRPC"].ttft_p50_ms
            print(f"{model_id} x{concurrency}: gateway adds {added:+.2f} ms to TTFT p50 over direct gRPC")


if __name__ == "__main__":
    main()
