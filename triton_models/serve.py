"""The Triton image's entry point: `python3 -m triton_models.serve --repository DIR`.

Starts `tritonserver` in the foreground (exec: tritonserver itself receives the container's signals). An
engine built for several GPUs (world size = tp x pp, read from the repository's manifest.json that
`build_engines build` wrote) runs one tritonserver process per rank under `mpirun`, in TensorRT-LLM's leader
mode: rank 0 serves the whole repository on the public ports; the other ranks load only the generation model,
open no ports, and follow rank 0 over MPI. Each rank gets its own Python-backend shared-memory prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from triton_models import tensors as t

MANIFEST_FILE = "manifest.json"  # written by build_engines next to the rendered models


@dataclass(frozen=True)
class ServerPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def world_size(repository: Path) -> int:
    """tp x pp of the engine this repository serves (1 for CPU repositories and repositories without a manifest)."""
    manifest = repository / MANIFEST_FILE
    if not manifest.is_file():
        return 1
    target = json.loads(manifest.read_text())["target"]
    return int(target.get("tp_size", 1)) * int(target.get("pp_size", 1))


def _rank_arguments(repository: Path, rank: int, ports: ServerPorts, extra: Sequence[str]) -> list[str]:
    common = [
        f"--model-repository={repository}",
        "--disable-auto-complete-config",
        f"--backend-config=python,shm-region-prefix-name=rank{rank}_",
    ]
    if rank == 0:
        return [
            *common,
            f"--http-port={ports.http}",
            f"--grpc-port={ports.grpc}",
            f"--metrics-port={ports.metrics}",
            *extra,
        ]
    # Followers: only the engine, no endpoints (they would collide with rank 0's ports in the same pod).
    return [
        *common,
        "--model-control-mode=explicit",
        f"--load-model={t.TENSORRT_LLM}",
        "--allow-http=false",
        "--allow-grpc=false",
        "--allow-metrics=false",
    ]


def server_command(
    repository: Path,
    world: int,
    ports: ServerPorts = ServerPorts(),
    tritonserver: str = "tritonserver",
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that serves `repository` on `world` GPUs."""
    if world < 1:
        raise ValueError(f"world size must be at least 1, not {world}")
    if world == 1:
        return [tritonserver, *_rank_arguments(repository, 0, ports, extra)]
    command = ["mpirun", "--allow-run-as-root"]
    for rank in range(world):
        if rank:
            command.append(":")
        command += ["-n", "1", tritonserver, *_rank_arguments(repository, rank, ports, extra)]
    return command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m triton_models.serve", description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path(os.environ.get("MODEL_REPOSITORY", "/repository")))
    parser.add_argument("--world-size", type=int, help="override tp x pp from the repository's manifest.json")
    parser.add_argument("--http-port", type=int, default=ServerPorts.http)
    parser.add_argument("--grpc-port", type=int, default=ServerPorts.grpc)
    parser.add_argument("--metrics-port", type=int, default=ServerPorts.metrics)
    parser.add_argument("--print", action="store_true", help="print the command instead of running it")
    args, extra = parser.parse_known_args(argv)
    if not (args.repository / t.ENSEMBLE / "config.pbtxt").is_file():
        print(f"error: {args.repository} is not a rendered model repository (no {t.ENSEMBLE}/config.pbtxt)",
              file=sys.stderr)  # fmt: skip
        return 2
    world = args.world_size or world_size(args.repository)
    ports = ServerPorts(args.http_port, args.grpc_port, args.metrics_port)
    command = server_command(args.repository, world, ports, extra=extra)
    print(" ".join(command), flush=True)
    if args.print:
        return 0
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
