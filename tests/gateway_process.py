"""The gateway as its own process, as production runs it: a config file written for the occasion,
`python -m gateway serve --config FILE`, and a wait for /readyz. One place for the tests that need a real
process (serve, drain on SIGTERM, soak) and for the benchmarks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from triton_models.launcher import free_port

ROOT = Path(__file__).resolve().parents[1]

TomlValue = str | int | float | bool | Path | Sequence[str]


def _toml(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's
    return "[" + ", ".join(json.dumps(item) for item in value) + "]"


def model_table(
    model_id: str, tokenizer_dir: Path, endpoints: Sequence[str], **fields: TomlValue
) -> dict[str, TomlValue]:
    """One [[models]] entry (context_length 8192 unless given)."""
    return {"id": model_id, "tokenizer_dir": tokenizer_dir, "context_length": 8192, "endpoints": endpoints, **fields}


def write_config(
    path: Path, port: int, data_dir: Path, models: Sequence[Mapping[str, TomlValue]], **settings: TomlValue
) -> Path:
    """A gateway config file on 127.0.0.1:port; settings are top-level keys (e.g. drain_timeout_s=60)."""
    lines = [f"host = {_toml('127.0.0.1')}", f"port = {port}", f"data_dir = {_toml(data_dir)}"]
    lines += [f"{key} = {_toml(value)}" for key, value in settings.items()]
    for model in models:
        lines += ["[[models]]", *(f"{key} = {_toml(value)}" for key, value in model.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def serve(
    config: Path, stdout: int | IO[Any] | None = None, stderr: int | IO[Any] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)], cwd=ROOT, stdout=stdout, stderr=stderr
    )


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the gateway process exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} was not ready within {timeout_s} s")


def start_logged(
    workdir: Path, models: Sequence[Mapping[str, TomlValue]], **settings: TomlValue
) -> tuple[subprocess.Popen[bytes], str]:
    """A ready gateway on a free port whose logs go to a file in workdir (for the benchmarks: writing them to
    the terminal would be part of what is measured)."""
    port = free_port()
    config = write_config(workdir / f"gateway-{port}.toml", port, workdir / f"data-{port}", models, **settings)
    log_path = workdir / f"gateway-{port}.log"
    with log_path.open("wb") as log:
        process = serve(config, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, 30)
    except AssertionError as error:
        process.kill()
        raise RuntimeError(f"the gateway did not become ready (log: {log_path})") from error
    return process, url
