"""The two ways to run the gateway as a process: `python -m gateway serve --config`, and embedded (`make serve`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import scale_gp

from build_engines.reference_model import REFERENCE_MODEL_ID
from tests.gateway_process import ROOT, model_table, serve, wait_ready, write_config
from triton_models.launcher import EmbeddedTriton, free_port


def _ask(url: str) -> str:
    client = scale_gp.SGPClient(base_url=url, api_key="k", max_retries=0)
    try:
        prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        response = client.completions.create(
            model=REFERENCE_MODEL_ID, prompt=prompt, model_parameters={"temperature": 0}
        )
        return response.completion.text
    finally:
        client.close()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_serve_with_a_config_file_against_an_external_triton(
    reference_triton: EmbeddedTriton, reference_checkpoint: Path, tmp_path: Path, event_loop: str
) -> None:
    """The production path: a config file, JSON logs, and the usage ledger flushed on SIGTERM; on either loop."""
    port = free_port()
    model = model_table(REFERENCE_MODEL_ID, reference_checkpoint, [reference_triton.grpc_url])
    config = write_config(tmp_path / "gateway.toml", port, tmp_path / "data", [model], event_loop=event_loop)
    process = serve(config, stderr=subprocess.PIPE)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, 30)
        assert "Paris" in _ask(f"http://127.0.0.1:{port}")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    logs = [json.loads(line) for line in stderr.decode().splitlines()]  # every line is JSON
    assert f"serving on {event_loop}'s event loop" in [entry["message"] for entry in logs]
    [access] = [entry for entry in logs if entry["logger"] == "gateway.access"]
    assert access["status"] == 200 and access["model"] == REFERENCE_MODEL_ID and access["completion_tokens"] > 0
    with sqlite3.connect(tmp_path / "data" / "ledger.sqlite3") as ledger:
        rows = ledger.execute("SELECT request_id, completion_tokens, status FROM usage_records").fetchall()
    assert rows == [(access["request_id"], access["completion_tokens"], 200)]


def test_configurations_it_cannot_start_with_are_one_line_errors(reference_checkpoint: Path, tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    model = model_table("m", reference_checkpoint, ["127.0.0.1:9"])
    cases = {
        tmp_path / "missing.toml": "cannot read the config file",
        tmp_path / "bad.toml": "is not valid TOML",
        tmp_path / "value.toml": "port: Input should be a valid integer",
        write_config(tmp_path / "tok.toml", free_port(), tmp_path / "d1", [{**model, "tokenizer_dir": tmp_path}]):
            f"model 'm': cannot load its tokenizer {tmp_path}/tokenizer.json",
        write_config(tmp_path / "port.toml", port, tmp_path / "d2", [model]): f"cannot listen on 127.0.0.1:{port}",
    }  # fmt: skip
    (tmp_path / "bad.toml").write_text("port = \n")
    (tmp_path / "value.toml").write_text('port = "x"\n')
    try:
        for config, message in cases.items():
            done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(config)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
            errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
            assert done.returncode == 2 and len(errors) == 1 and message in errors[0], (config.name, done.stderr)
            assert "Traceback" not in done.stderr
        embedded = subprocess.run([sys.executable, "-m", "gateway", "embedded", "--port", str(port)], cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
        assert embedded.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in embedded.stderr
        assert "starting Triton" not in embedded.stdout  # refused before minutes of preparing it
    finally:
        taken.close()


def test_environment_overrides_the_config_file(reference_checkpoint: Path, tmp_path: Path) -> None:
    from gateway.settings import GatewaySettings

    config = tmp_path / "gateway.toml"
    config.write_text(f'port = 1234\n[[models]]\nid = "m"\ntokenizer_dir = "{reference_checkpoint}"\n'
                      'context_length = 8\nendpoints = ["x:1"]\n')  # fmt: skip
    assert GatewaySettings.from_file(config).ledger_spill == GatewaySettings.from_file(config).data_dir
    os.environ["GATEWAY_PORT"] = "4321"
    os.environ["GATEWAY_LEDGER_SPILL_DIR"] = "/spill"  # the Kubernetes deployment's shared volume
    try:
        settings = GatewaySettings.from_file(config)
        assert settings.port == 4321 and settings.ledger_spill == Path("/spill")
    finally:
        del os.environ["GATEWAY_PORT"], os.environ["GATEWAY_LEDGER_SPILL_DIR"]
    assert GatewaySettings.from_file(config).port == 1234


def _start_embedded(port: int) -> subprocess.Popen[bytes]:
    """`python -m gateway embedded` (what `make serve` runs), its output collected."""
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "embedded", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_embedded_mode_serves_the_reference_model_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    process = _start_embedded(port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, 180)
        assert "Paris" in _ask(f"http://127.0.0.1:{port}")
        process.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        assert "curl -s http://127.0.0.1:" in output.decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # The embedded server's shm prefix carries the gateway process's pid.
    pattern = f"shm-region-prefix-name=tcs{process.pid}"
    leftovers = subprocess.run(["pgrep", "-f", pattern], capture_output=True, check=False)
    assert leftovers.stdout == b""
    assert not list(Path("/dev/shm").glob(f"tcs{process.pid}*"))


def test_embedded_mode_stops_when_its_triton_dies(tmp_path: Path) -> None:
    port = free_port()
    process = _start_embedded(port)
    pattern = f"shm-region-prefix-name=tcs{process.pid}"
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, 180)
        found = subprocess.run(["pgrep", "-x", "tritonserver", "-P", str(process.pid)], capture_output=True, text=True)
        (triton_pid,) = found.stdout.split()
        os.kill(int(triton_pid), signal.SIGKILL)  # Triton gone, as after an OOM kill
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 1  # not serving 503s forever
        assert "the embedded Triton server exited" in output.decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # Its model processes go with it (they watch their parent), and their shared memory.
    deadline = time.monotonic() + 15
    while subprocess.run(["pgrep", "-f", pattern], capture_output=True, check=False).stdout:
        assert time.monotonic() < deadline, "model processes outlived their Triton"
        time.sleep(0.2)
    assert not list(Path("/dev/shm").glob(f"tcs{process.pid}*"))
