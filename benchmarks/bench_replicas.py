"""Throughput with two Triton replicas behind one gateway vs one, on SmolLM2 (cpu_llm), in one run.

Three set-ups, the same load (at each --concurrency level, every stream makes --requests-per-stream
requests, greedy, --max-tokens each), all through the gateway (its own process, unpinned):

  1 replica, 1 core      one Triton pinned to core 0, its engine on one BLAS thread
  2 replicas, 1 core each  two Tritons pinned to cores 0 and 1, one BLAS thread each (the gateway balances)
  1 replica, all cores   one unpinned Triton with default BLAS threads (what `make serve` runs)

The ratio that matters is the second row over the first: generation is CPU-bound, so a second replica on its
own core should come close to doubling throughput; what it loses is the gateway's and the ensemble's share of
the same cores.

    make bench-replicas      # or: .venv/bin/python benchmarks/bench_replicas.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from benchmarks.bench_gateway import Summary, load, via_gateway  # noqa: E402
from build_engines.reference_model import REFERENCE_MODEL_ID, ensure_reference_checkpoint  # noqa: E402
from build_engines.repository import RepositorySettings, render_repository  # noqa: E402
from tests.gateway_process import model_table, start_logged  # noqa: E402
from triton_models.launcher import EmbeddedTriton  # noqa: E402

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def start_gateway(
    workdir: Path, checkpoint: Path, servers: list[EmbeddedTriton]
) -> tuple[subprocess.Popen[bytes], str]:
    return start_logged(workdir, [model_table(REFERENCE_MODEL_ID, checkpoint, [s.grpc_url for s in servers])])


async def drive(url: str, args: argparse.Namespace) -> list[Summary]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        def one(_: int):  # type: ignore[no-untyped-def]
            return via_gateway(session, url, REFERENCE_MODEL_ID, args.max_tokens)

        await load(4, 1, one)  # warm-up
        return [await load(c, max(1, args.requests_per_stream), one) for c in args.concurrency]


def run_setup(
    name: str, servers_spec: list[tuple[frozenset[int] | None, dict[str, str]]], repository: Path, checkpoint: Path,
    workdir: Path, args: argparse.Namespace,
) -> tuple[str, list[Summary]]:  # fmt: skip
    servers = []
    try:
        for index, (cpus, env) in enumerate(servers_spec):
            log = workdir / f"{name.replace(' ', '_').replace(',', '')}-{index}.log"
            servers.append(EmbeddedTriton(repository, log_path=log, cpus=cpus, env=env).start())
        gateway, url = start_gateway(workdir, checkpoint, servers)
        try:
            return name, asyncio.run(drive(url, args))
        finally:
            gateway.terminate()
            gateway.wait(30)
    finally:
        for server in servers:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--requests-per-stream", type=int, default=4, help="requests each concurrent client makes")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        sys.exit("needs at least 2 cores")
    checkpoint = ensure_reference_checkpoint()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        repository = render_repository(RepositorySettings(checkpoint_dir=str(checkpoint)), workdir / "repository")
        setups = [
            ("1 replica, 1 core", [(frozenset({cores[0]}), ONE_THREAD)]),
            ("2 replicas, 1 core each", [(frozenset({cores[0]}), ONE_THREAD), (frozenset({cores[1]}), ONE_THREAD)]),
            ("1 replica, all cores", [(None, {})]),
        ]
        rows = [run_setup(name, spec, repository, checkpoint, workdir, args) for name, spec in setups]
    print(
        f"\nSmolLM2-135M (cpu_llm) through the gateway: {args.requests_per_stream} requests per concurrent stream, "
        f"{args.max_tokens} tokens each, greedy; {len(cores)} cores\n"
    )
    header = (
        f"| {'streams':>7} | {'set-up':<24} | {'req/s':>6} | {'tok/s':>7} | {'TTFT p50 ms':>11} "
        f"| {'vs 1 replica, 1 core':>20} |"
    )
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for level, concurrency in enumerate(args.concurrency):
        base = rows[0][1][level].tokens_per_s
        for name, summaries in rows:
            summary = summaries[level]
            print(
                f"| {concurrency:>7} | {name:<24} | {summary.requests_per_s:>6.2f} | {summary.tokens_per_s:>7.1f} | "
                f"{summary.ttft_p50_ms:>11.0f} | {summary.tokens_per_s / base:>19.2f}x |"
            )


if __name__ == "__main__":
    main()
