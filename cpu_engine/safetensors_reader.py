"""Read `.safetensors` files into float32 numpy arrays without torch.

numpy has no bfloat16, and most published checkpoints store bfloat16, so the file format is read
directly: an 8-byte little-endian header length, a JSON header, then raw tensor bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cpu_engine.errors import CheckpointError

_NUMPY_DTYPES: dict[str, str] = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}


def _to_float32(raw: npt.NDArray[np.uint8], dtype: str, shape: list[int]) -> npt.NDArray[np.float32]:
    if dtype == "BF16":
        # bfloat16 is the upper half of a float32: widen by shifting into the high 16 bits.
        widened = raw.view("<u2").astype(np.uint32) << 16
        return widened.view(np.float32).reshape(shape)
    if dtype not in _NUMPY_DTYPES:
        raise CheckpointError(f"safetensors dtype {dtype} is not supported")
    # float32 stays a read-only view of the mapped file: no copy, and pages shared between processes.
    return raw.view(_NUMPY_DTYPES[dtype]).astype(np.float32, copy=False).reshape(shape)


def iter_safetensors(path: Path) -> Iterator[tuple[str, npt.NDArray[np.float32]]]:
    """Yield (name, float32 array) for every tensor in one file; a damaged file is a CheckpointError."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path.name}: not a safetensors file ({size} bytes)")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    base = 8 + header_len
    if base > size:
        raise CheckpointError(f"{path.name}: truncated or not a safetensors file (header of {header_len} bytes)")
    try:
        header = json.loads(bytes(data[8:base]))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path.name}: the safetensors header is not valid JSON ({error})") from None
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: tensor {name!r} has a malformed header entry") from None
        itemsize = np.dtype(_NUMPY_DTYPES.get(dtype, "<f4")).itemsize if dtype != "BF16" else 2
        if dtype not in _NUMPY_DTYPES and dtype != "BF16":
            raise CheckpointError(f"safetensors dtype {dtype} is not supported")
        if not 0 <= start <= end <= size - base or end - start != itemsize * int(np.prod(shape)):
            raise CheckpointError(f"{path.name}: tensor {name!r} lies outside the file or does not match its shape")
        yield name, _to_float32(np.asarray(data[base + start : base + end]), dtype, shape)


_SHARD_INDEX = "model.safetensors.index.json"


def _weight_files(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint's weight files: those its shard index names, else every .safetensors file (one, or the
    shards of an index-less checkpoint)."""
    index = checkpoint_dir / _SHARD_INDEX
    if not index.is_file():
        return sorted(checkpoint_dir.glob("*.safetensors"))
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{index}: not a safetensors shard index ({error!r})") from None
    files = [checkpoint_dir / name for name in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index.name} names shards that are missing: {', '.join(missing)}")
    return files


def load_checkpoint_tensors(checkpoint_dir: Path) -> dict[str, npt.NDArray[np.float32]]:
    """All tensors of a checkpoint directory (single file or sharded).

    A tensor found in two files is refused rather than taken from whichever sorts last: such a directory
    holds two checkpoints (e.g. Mistral's consolidated.safetensors beside the sharded files without an index).
    """
    files = _weight_files(checkpoint_dir)
    if not files:
        raise CheckpointError(f"{checkpoint_dir}: no .safetensors weights")
    tensors: dict[str, npt.NDArray[np.float32]] = {}
    found_in: dict[str, str] = {}
    for file in files:
        for name, tensor in iter_safetensors(file):
            if name in found_in:
                raise CheckpointError(
                    f"{checkpoint_dir}: tensor {name!r} is in both {found_in[name]} and {file.name}; one checkpoint"
                    " per directory"
                )
            found_in[name] = file.name
            tensors[name] = tensor
    return tensors
