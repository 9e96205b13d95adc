"""What the usage ledger costs the gateway: throughput with the ledger on (SQLite, and PostgreSQL where a
server can be started) vs off, in one run, runs interleaved (off, on, off, on, ...) to spread the noise.

On the echo generation model (no model: the gateway's own work is all there is, the worst case for the
ledger's share), --concurrency streams, --requests per run, --max-tokens each, through the gateway in its
own process.

    make bench-ledger        # or: .venv/bin/python benchmarks/bench_ledger.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from benchmarks.bench_gateway import load, via_gateway  # noqa: E402
from build_engines.reference_model import ensure_reference_checkpoint  # noqa: E402
from build_engines.repository import RepositorySettings, render_repository  # noqa: E402
from tests.gateway_process import TomlValue, model_table, start_logged  # noqa: E402
from tests.postgres_server import PostgresServer, PostgresUnavailable  # noqa: E402
from tests.processes import cpu_seconds  # noqa: E402
from tests.triton_client import metric_value  # noqa: E402
from triton_models import tensors as t  # noqa: E402
from triton_models.launcher import EmbeddedTriton  # noqa: E402

MODEL = "echo"
# The gateway's own count of the CPU its ledger write path used.
LEDGER_CPU = "gateway_ledger_cpu_seconds_total"


def start_gateway(
    workdir: Path, checkpoint: Path, server: EmbeddedTriton, ledger: str
) -> tuple[subprocess.Popen[bytes], str]:
    settings: dict[str, TomlValue] = {"log_format": "json"}
    if ledger == "off":
        settings["ledger_enabled"] = False
    elif ledger.startswith("postgresql://"):
        settings["ledger_dsn"] = ledger
    model = model_table(MODEL, checkpoint, [server.grpc_url], generation_model=t.ECHO_LLM)
    return start_logged(workdir, [model], **settings)


async def drive(url: str, pid: int, args: argparse.Namespace) -> tuple[float, float, float]:
    """(requests/s, gateway CPU ms per request, of which the ledger's write path)"""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        def one(_: int):  # type: ignore[no-untyped-def]
            return via_gateway(session, url, MODEL, args.max_tokens)

        await load(4, 4, one)  # warm-up
        per_client = max(1, args.requests // args.concurrency)
        before, ledger_before = cpu_seconds(pid), metric_value(f"{url}/metrics", LEDGER_CPU)
        summary = await load(args.concurrency, per_client, one)
        await asyncio.sleep(1.0)  # the ledger's batch for this run is written (and counted) too
        used = cpu_seconds(pid) - before
        ledger_used = metric_value(f"{url}/metrics", LEDGER_CPU) - ledger_before
        requests = per_client * args.concurrency
        return summary.requests_per_s, 1000 * used / requests, 1000 * ledger_used / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=640, help="requests per run")
    parser.add_argument("--rounds", type=int, default=4, help="runs per set-up, interleaved")
    args = parser.parse_args()
    checkpoint = ensure_reference_checkpoint()
    postgres = None
    try:
        postgres = PostgresServer().start()
    except PostgresUnavailable as reason:
        print(f"(no PostgreSQL: {reason})")
    setups = {"ledger off": "off", "ledger on (SQLite)": "sqlite"}
    if postgres is not None:
        setups["ledger on (PostgreSQL)"] = postgres.dsn
    results: dict[str, list[float]] = {name: [] for name in setups}
    cpu: dict[str, list[float]] = {name: [] for name in setups}
    ledger_cpu: dict[str, list[float]] = {name: [] for name in setups}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            settings = RepositorySettings(checkpoint_dir=str(checkpoint), generation_model=t.ECHO_LLM)
            repository = render_repository(settings, workdir / "repository")
            with EmbeddedTriton(repository, log_path=workdir / "triton.log") as server:
                for _ in range(args.rounds):
                    for name, ledger in setups.items():
                        gateway, url = start_gateway(workdir, checkpoint, server, ledger)
                        try:
                            rate, cpu_ms, ledger_ms = asyncio.run(drive(url, gateway.pid, args))
                            results[name].append(rate)
                            cpu[name].append(cpu_ms)
                            ledger_cpu[name].append(ledger_ms)
                        finally:
                            gateway.terminate()
                            gateway.wait(30)
    finally:
        if postgres is not None:
            postgres.destroy()
    base = statistics.median(results["ledger off"])
    base_cpu = statistics.median(cpu["ledger off"])
    print(
        f"\nThe gateway on echo_llm: {args.concurrency} streams, {args.requests} requests per run, "
        f"{args.max_tokens} tokens each; {args.rounds} interleaved runs per set-up (median)\n"
    )
    print(
        "| set-up | req/s (median) | runs | vs ledger off | gateway CPU ms/request | vs ledger off "
        "| ledger write path CPU ms/request | its share of the gateway's CPU |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, values in results.items():
        runs = ", ".join(f"{v:.0f}" for v in values)
        rate, cpu_ms = statistics.median(values), statistics.median(cpu[name])
        ledger_ms = statistics.median(ledger_cpu[name])
        print(
            f"| {name} | {rate:.1f} | {runs} | {rate / base:.3f}x | {cpu_ms:.3f} | {cpu_ms / base_cpu:.3f}x "
            f"| {ledger_ms:.4f} | {100 * ledger_ms / cpu_ms:.2f}% |"
        )


if __name__ == "__main__":
    main()
