"""Writing a checkpoint is all or nothing, never mixes with other files, and reading one takes only its own
weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from build_engines.cli import main as build_engines_main
from build_engines.hf_checkpoint import CHECKPOINT_FILES, checkpoint_source
from build_engines.tiny_checkpoints import TokenizerStyle, write_tiny_checkpoint
from cpu_engine.errors import CheckpointError
from cpu_engine.safetensors_reader import load_checkpoint_tensors


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_a_new_checkpoint_replaces_the_previous_one_whole(tmp_path: Path) -> None:
    out = tmp_path / "ck"
    write_tiny_checkpoint(out, TokenizerStyle.BYTE_BPE, seed=0)
    other = write_tiny_checkpoint(tmp_path / "other", TokenizerStyle.SENTENCEPIECE, seed=1)
    write_tiny_checkpoint(out, TokenizerStyle.SENTENCEPIECE, seed=1)
    assert _files(out) == _files(other)
    assert checkpoint_source(out) == "tiny sentencepiece checkpoint, seed 1"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_a_failed_write_leaves_the_previous_checkpoint_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import build_engines.tiny_checkpoints as tiny

    out = write_tiny_checkpoint(tmp_path / "ck", TokenizerStyle.BYTE_BPE)
    before = _files(out)
    # Weights that fail to serialize: the config and tokenizer files are written by then.
    monkeypatch.setattr(tiny, "_random_weights", lambda *_: {"model.embed_tokens.weight": "not an array"})
    with pytest.raises(ValueError):
        write_tiny_checkpoint(out, TokenizerStyle.SENTENCEPIECE, seed=3)
    assert _files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_an_output_directory_holding_other_files_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"holds files that are not a checkpoint written here \(notes.txt\)"):
        write_tiny_checkpoint(out, TokenizerStyle.BYTE_BPE)
    assert _files(out) == {"notes.txt": b"keep me"}
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert build_engines_main(["tiny", "--style", "byte_bpe", "--out", str(a_file)]) == 1
    assert "exists and is not a directory" in capsys.readouterr().err


def test_checkpoint_files_are_readable_as_the_umask_allows(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        out = write_tiny_checkpoint(tmp_path / "ck", TokenizerStyle.BYTE_BPE)
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {name: (out / name).stat().st_mode & 0o777 for name in CHECKPOINT_FILES} == dict.fromkeys(
        CHECKPOINT_FILES, 0o644
    )


def test_the_reader_follows_the_shard_index_and_refuses_a_tensor_found_twice(tmp_path: Path) -> None:
    one, two = np.ones((2, 2), dtype=np.float32), np.full((3,), 2.0, dtype=np.float32)
    save_file({"a": one}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": two}, str(tmp_path / "model-00002-of-00002.safetensors"))
    save_file({"a": one * 7, "b": two * 7}, str(tmp_path / "consolidated.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'a' is in both consolidated\.safetensors and model-00001"):
        load_checkpoint_tensors(tmp_path)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = load_checkpoint_tensors(tmp_path)
    assert np.array_equal(tensors["a"], one) and np.array_equal(tensors["b"], two)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shards that are missing: model-00002-of-00002\.safetensors"):
        load_checkpoint_tensors(tmp_path)
