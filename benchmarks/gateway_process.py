"""The gateway as its own process for the benchmarks (as in production): start it on a config, wait until
it is ready."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from triton_models.launcher import free_port


def start_gateway_process(workdir: Path, settings: list[str], models: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    """settings: top-level TOML lines; models: the lines of one [[models]] table. Its logs go to a file in
    workdir (not the terminal: writing them there would be part of what is measured)."""
    port = free_port()
    config = workdir / f"gateway-{port}.toml"
    lines = ['host = "127.0.0.1"', f"port = {port}", f'data_dir = "{workdir / f"data-{port}"}"', *settings,
             "[[models]]", *models]  # fmt: skip
    config.write_text("\n".join(lines) + "\n")
    with (workdir / f"gateway-{port}.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)], stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the gateway did not become ready (log: {workdir / f'gateway-{port}.log'})")
