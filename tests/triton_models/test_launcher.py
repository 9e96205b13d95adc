"""The embedded Triton launcher's failure modes: each says what is wrong and leaves nothing behind."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from triton_models.launcher import EmbeddedTriton, TritonLaunchError, TritonPorts, pytriton_server_root

BROKEN_MODEL = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("this model is broken on purpose")
    def execute(self, requests):
        return []
"""


def _repository_with_broken_model(root: Path) -> Path:
    model = root / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'name: "broken"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "X", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
        'output [ { name: "Y", data_type: TYPE_INT32, dims: [ 1 ] } ]\n'
    )
    (model / "1" / "model.py").write_text(BROKEN_MODEL)
    return root / "repo"


def test_missing_binary_says_how_to_install_it(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    with pytest.raises(TritonLaunchError, match="pip install nvidia-pytriton"):
        EmbeddedTriton(tmp_path / "repo", server_root=tmp_path / "nowhere").start()


def test_taken_port_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedTriton(
            _repository_with_broken_model(tmp_path), ports=TritonPorts(http=port, grpc=0, metrics=0)
        )
        with pytest.raises(TritonLaunchError, match=f"port {port} on 127.0.0.1 is already in use"):
            server.start()


def test_model_that_fails_to_load_is_named_and_shm_is_cleaned(tmp_path: Path) -> None:
    server = EmbeddedTriton(_repository_with_broken_model(tmp_path), ready_timeout_s=60)
    with pytest.raises(TritonLaunchError, match="failed to load: broken") as failure:
        server.start()
    assert "this model is broken on purpose" in failure.value.args[0]
    assert not server.is_running()
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


def test_clean_stop_leaves_no_shared_memory(reference_triton: EmbeddedTriton, tmp_path: Path) -> None:
    # The session server is running: its regions exist under its own prefix, and no other server's.
    assert list(Path("/dev/shm").glob(f"{reference_triton.shm_prefix}*"))
    assert pytriton_server_root().is_dir()
