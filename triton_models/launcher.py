"""Start and stop the Triton Inference Server that the `nvidia-pytriton` wheel bundles.

Used by `make serve` and by the test fixtures. Only the server binary and the Python backend are taken
from the wheel (never PyTriton's Python API), and nothing is written into site-packages: the backend
directory is a private folder of symlinks. The pitfalls this module guards against (each seen on this
kind of machine):

- the Python backend stub must match the running Python and find the project's environment (first
  `python3` on PATH, the same libpython via LD_LIBRARY_PATH); a stub that cannot load its libpython makes
  the server hang at start-up, so the stub is checked with `ldd` and readiness has a deadline;
- every model instance keeps a `/dev/shm/<prefix>*` region that a crash leaves behind, so each server
  gets its own prefix and removes exactly its own leftovers;
- a taken port or a model that fails to load exits the server: the error names the port or the model.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cpu_engine.blas import blas_environment

LOOPBACK = "127.0.0.1"
PYTRITON_PIN = "nvidia-pytriton==0.7.0"
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


class TritonLaunchError(RuntimeError):
    """The embedded Triton server could not be started; the message says why."""


def pytriton_server_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonLaunchError(f"the Triton server binary is not installed: pip install {PYTRITON_PIN}")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class TritonPorts:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def pick(cls) -> TritonPorts:
        return cls(http=free_port(), grpc=free_port(), metrics=free_port())


@dataclass
class EmbeddedTriton:
    """One tritonserver process serving `repository` on loopback ports."""

    repository: Path
    ports: TritonPorts = field(default_factory=TritonPorts.pick)
    log_path: Path | None = None  # default: server.log in the private working folder
    ready_timeout_s: float = 180.0
    server_root: Path | None = None  # default: the nvidia-pytriton wheel's tritonserver folder
    extra_args: tuple[str, ...] = ()
    cpus: frozenset[int] | None = None  # pin the server (and its model stubs) to these cores
    env: dict[str, str] = field(default_factory=dict)  # added to the server's environment
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.shm_prefix = f"tcs{os.getpid()}{uuid.uuid4().hex[:8]}_"
        self._workdir = Path(tempfile.mkdtemp(prefix="embedded-triton-"))
        if self.log_path is None:
            self.log_path = self._workdir / "server.log"

    # ---- addresses ----------------------------------------------------------------------------

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.metrics}/metrics"

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> EmbeddedTriton:
        root = self.server_root or pytriton_server_root()
        binary = root / "bin" / "tritonserver"
        if not binary.is_file():
            raise TritonLaunchError(f"{binary} is missing: pip install {PYTRITON_PIN}")
        if not self.repository.is_dir():
            raise TritonLaunchError(f"model repository {self.repository} does not exist")
        backends = self._backend_directory(root)
        for port in (self.ports.http, self.ports.grpc, self.ports.metrics):
            _check_port_free(port)
        command = [
            str(binary),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--http-address={LOOPBACK}",
            f"--grpc-address={LOOPBACK}",
            f"--metrics-address={LOOPBACK}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            *self.extra_args,
        ]
        assert self.log_path is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self._environment(), **self.env},
                start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop the server in order
                preexec_fn=functools.partial(_prepare_child, self.cpus),
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after timeout_s; remove this server's /dev/shm leftovers and working folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        if self.log_path is not None and self._workdir in self.log_path.parents:
            # Keep the log readable after stop; remove only the backend symlinks.
            shutil.rmtree(self._workdir / "backends", ignore_errors=True)
        else:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return self.log_path.read_text(errors="replace")

    # ---- helpers ------------------------------------------------------------------------------

    def _backend_directory(self, root: Path) -> Path:
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise TritonLaunchError(f"the Triton wheel has no Python backend stub for Python {version}")
        _check_links(stub)
        target = self._workdir / "backends" / "python"
        target.mkdir(parents=True, exist_ok=True)
        for name in _PYTHON_BACKEND_FILES:
            # Without triton_python_backend_utils.py here, loading fails with a misleading "No module named 'model'".
            (target / name).symlink_to(root / "backends" / "python" / name)
        (target / stub.name).symlink_to(stub)
        return target.parent

    @staticmethod
    def _environment() -> dict[str, str]:
        # A CPU that OpenBLAS does not recognise (a VM hiding its model) gets a kernel named for it.
        env = blas_environment(os.environ)
        # The stub finds its environment from the first python3 on PATH (and that folder's pyvenv.cfg),
        # and must map the same libpython as this interpreter.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
        return env

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise TritonLaunchError(self._explain_exit(code))
            if _http_ok(f"{self.http_url}/v2/health/ready"):
                return
            time.sleep(0.1)
        raise TritonLaunchError(
            f"Triton was not ready after {self.ready_timeout_s:.0f} s; last log lines:\n{_tail(self.log_text())}"
        )

    def _explain_exit(self, code: int) -> str:
        log = self.log_text()
        taken = re.search(r"Socket '([^']*)' already in use", log) or re.search(r"address already in use", log, re.I)
        if taken:
            return f"Triton exited: a port is already in use ({taken.group(0)})"
        failed = re.findall(r"failed to load '([^']+)'", log)
        if failed:
            reasons = [line for line in log.splitlines() if "failed to load '" in line]
            return f"Triton exited: model(s) failed to load: {', '.join(dict.fromkeys(failed))}\n" + "\n".join(reasons)
        return f"Triton exited with code {code}; last log lines:\n{_tail(log)}"


def _prepare_child(cpus: frozenset[int] | None) -> None:
    """In the child before exec: if the process that started the server dies, the server gets SIGTERM; and
    the CPU pinning, which the model stubs it starts inherit."""
    import ctypes

    if cpus:
        os.sched_setaffinity(0, cpus)
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _check_port_free(port: int) -> None:
    """Fail early if something listens on the port. SO_REUSEADDR as Triton itself sets it: connections of a
    previous server on the same port lingering in TIME_WAIT do not stop a new one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError as error:
            raise TritonLaunchError(f"port {port} on {LOOPBACK} is already in use") from error


def _check_links(stub: Path) -> None:
    ldd = shutil.which("ldd")
    if ldd is None:
        return
    env = EmbeddedTriton._environment()
    result = subprocess.run([ldd, str(stub)], capture_output=True, text=True, env=env, check=False)
    missing = [line.split()[0] for line in result.stdout.splitlines() if "not found" in line]
    if missing:
        raise TritonLaunchError(f"the Python backend stub cannot load {', '.join(missing)} (it would hang at start-up)")


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])
