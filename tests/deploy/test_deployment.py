"""The deployment files: one container version everywhere, the CPU compose variant differs only where it must,
the Triton entry point's launch plans, and a gateway image without the engine's dependencies."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from build_engines.targets import load_targets
from triton_models import tensors as t
from triton_models.serve import MANIFEST_FILE, ServerPorts, server_command, world_size

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONTAINER_VERSION = load_targets().container.version


def _compose(*files: str) -> dict[str, Any]:
    args = [str(BIN / "docker-compose")]
    for name in files:
        args += ["-f", str(ROOT / "docker" / name)]
    output = subprocess.run(
        [*args, "--profile", "build", "config", "--format", "json"], capture_output=True, check=True, text=True
    ).stdout
    return json.loads(output)  # type: ignore[no-any-return]


def test_the_ngc_release_is_the_one_build_engines_targets_everywhere() -> None:
    dockerfile = (ROOT / "docker" / "triton.Dockerfile").read_text()
    assert re.search(r"^ARG TRITON_VERSION=(\S+)$", dockerfile, re.M)[1] == CONTAINER_VERSION  # type: ignore[index]
    # The engine build's convert and quantize scripts come from the same TensorRT-LLM release, where it runs them.
    container = load_targets().container
    assert re.search(r"^ARG TENSORRT_LLM_VERSION=(\S+)$", dockerfile, re.M)[1] == container.tensorrt_llm_version  # type: ignore[index]
    assert re.search(r"^ARG TENSORRT_LLM_EXAMPLES=(\S+)$", dockerfile, re.M)[1] == container.examples_dir  # type: ignore[index]
    compose = (ROOT / "docker" / "compose.yaml").read_text()
    assert set(re.findall(r"\$\{TRITON_VERSION:-([^}]+)\}", compose)) == {CONTAINER_VERSION}
    kustomization = (ROOT / "kubernetes" / "base" / "kustomization.yaml").read_text()
    assert f'name: triton-completions-triton\n    newTag: "{CONTAINER_VERSION}"' in kustomization


def test_the_cpu_compose_variant_differs_only_in_gpus_and_the_build_target() -> None:
    gpu, cpu = _compose("compose.yaml"), _compose("compose.yaml", "compose.cpu.yaml")
    services = {"build-engines", "triton", "gateway", "prometheus", "grafana"}
    assert set(gpu["services"]) == set(cpu["services"]) == services
    for name in ("triton", "build-engines"):
        devices = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]
        assert "deploy" not in cpu["services"][name]
    differences = {}
    for name, service in gpu["services"].items():
        for key in set(service) | set(cpu["services"][name]):
            if service.get(key) != cpu["services"][name].get(key):
                differences[(name, key)] = (service.get(key), cpu["services"][name].get(key))
    assert set(differences) == {("triton", "deploy"), ("build-engines", "deploy"), ("build-engines", "command")}
    gpu_command, cpu_command = differences[("build-engines", "command")]
    changed = {(a, b) for a, b in zip(gpu_command, cpu_command, strict=True) if a != b}
    assert changed == {("--target=h100", "--target=cpu"), ("--model-id=my-model", "--model-id=smollm2-135m-instruct")}


def test_compose_wires_the_build_output_into_triton_and_the_gateway() -> None:
    services = _compose("compose.yaml")["services"]
    assert "--endpoint=triton:8001" in services["build-engines"]["command"]
    assert services["gateway"]["command"] == ["--config", "/repository/gateway-model.toml"]
    assert services["gateway"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert int(services["triton"]["shm_size"]) >= 1 << 30
    prometheus = (ROOT / "docker" / "prometheus.yml").read_text()
    assert '"gateway:8080"' in prometheus and '"triton:8002"' in prometheus


def test_one_gpu_is_one_tritonserver_on_the_public_ports(tmp_path: Path) -> None:
    command = server_command(tmp_path, 1, ServerPorts(http=1, grpc=2, metrics=3))
    assert command[0] == "tritonserver"
    assert {"--http-port=1", "--grpc-port=2", "--metrics-port=3", f"--model-repository={tmp_path}"} <= set(command)


def test_several_gpus_are_one_rank_each_under_mpirun_in_leader_mode(tmp_path: Path) -> None:
    command = server_command(tmp_path, 4)
    assert command[:2] == ["mpirun", "--allow-run-as-root"]
    ranks = " ".join(command[2:]).split(" : ")
    assert len(ranks) == 4 and all(rank.startswith("-n 1 tritonserver ") for rank in ranks)
    prefixes = [re.search(r"shm-region-prefix-name=(\S+)", rank)[1] for rank in ranks]  # type: ignore[index]
    assert len(set(prefixes)) == 4  # Python-backend shared memory per rank
    assert "--grpc-port=8001" in ranks[0] and "--model-control-mode" not in ranks[0]
    for follower in ranks[1:]:
        assert f"--load-model={t.TENSORRT_LLM}" in follower and "--allow-grpc=false" in follower
        assert "--grpc-port" not in follower  # no port clashes with rank 0 in the same pod


def test_world_size_comes_from_the_build_manifest(tmp_path: Path) -> None:
    assert world_size(tmp_path) == 1  # a CPU repository or one rendered by hand
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"target": {"tp_size": 2, "pp_size": 2}}))
    assert world_size(tmp_path) == 4


def test_the_entry_point_refuses_a_folder_that_is_not_a_repository(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "triton_models.serve", "--repository", str(tmp_path), "--print"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "is not a rendered model repository" in run.stderr
    (tmp_path / t.ENSEMBLE).mkdir()
    (tmp_path / t.ENSEMBLE / "config.pbtxt").write_text("")
    run = subprocess.run(
        [sys.executable, "-m", "triton_models.serve", "--repository", str(tmp_path), "--print", "--log-verbose=1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and run.stdout.startswith("tritonserver ") and "--log-verbose=1" in run.stdout


BLOCK_EXTRAS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"safetensors", "gguf", "pytriton", "torch", "transformers", "PIL"}:
            raise ImportError(f"{name} is not in the gateway image")
sys.meta_path.insert(0, Block())
"""


def test_the_gateway_runs_without_the_engine_dependencies() -> None:
    """The slim gateway image installs the project without extras: the gateway must not need them."""
    code = BLOCK_EXTRAS + (
        "import gateway.__main__, gateway.app\n"
        "from gateway.settings import GatewaySettings\n"
        f"GatewaySettings.from_file(__import__('pathlib').Path({str(ROOT / 'gateway' / 'gateway.example.toml')!r}))\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


@pytest.mark.parametrize("dependency", ["safetensors", "gguf", "nvidia-pytriton"])
def test_engine_dependencies_are_extras_not_gateway_requirements(dependency: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(requirement.startswith(dependency) for requirement in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(r.startswith(dependency) for r in extras["models"] + extras["embedded"])


def test_the_dashboard_plots_metrics_that_exist() -> None:
    """Every gateway metric the Grafana dashboard queries is one the gateway exports (Triton's are nv_*)."""
    from prometheus_client import generate_latest

    from gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    metrics.requests.labels("m", "200", "stop").inc()  # labelled families appear once they have a child
    for family in (metrics.time_to_first_token, metrics.inter_token_latency, metrics.request_duration,
                   metrics.queue_wait, metrics.prompt_tokens, metrics.completion_tokens, metrics.in_flight,
                   metrics.queued):  # fmt: skip
        family.labels("m")
    metrics.replica_ready.labels("m", "r")
    metrics.replica_in_flight.labels("r")
    exported = {line.split("{")[0].split(" ")[0] for line in generate_latest(metrics.registry).decode().splitlines()
                if line and not line.startswith("#")}  # fmt: skip
    dashboard = json.loads((ROOT / "docker" / "grafana" / "dashboards" / "triton-completions.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"\b(gateway_[a-z_]+)", expr)}
    assert used and used <= exported, used - exported
    assert len(dashboard["panels"]) >= 10
    compose = _compose("compose.yaml")["services"]["grafana"]
    assert any(volume["target"] == "/var/lib/grafana/dashboards" for volume in compose["volumes"])
