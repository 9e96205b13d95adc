"""The adapter store: custom model ids → LoRA adapters on a base model, converted for TensorRT-LLM's inputs.

Registering validates a Hugging Face PEFT adapter against its base model (shapes from the base checkpoint's
config.json; rank and target modules against what the base's engine was built with), converts it into the
`lora_weights` / `lora_config` tensors that the tensorrt_llm backend and the CPU generation model both take,
and stores them under `<root>/<custom id>/`. One directory per custom model, made in a staging directory
and renamed into place, so a failed registration leaves nothing behind and readers never see half of one.
The gateway and `python -m build_engines adapter` share the store (on a shared volume when there are several
gateways); the gateway notices changes by the root directory's modification time.

The task id (TensorRT-LLM's `lora_task_id`, the key of the server's LoRA cache) is derived from the converted
tensors: re-registering different weights under the same custom id can never hit a stale cache entry.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import uuid
from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cpu_engine import CheckpointError, ModelConfig
from cpu_engine.lora import MODULES, TRTLLM_MODULES, load_peft_adapter, to_trtllm

METADATA_FILE = "adapter.json"
WEIGHTS_FILE = "lora_weights.npy"
CONFIG_FILE = "lora_config.npy"
CUSTOM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class AdapterError(ValueError):
    """An adapter cannot be registered (or found); the message says why. `field` names the request part."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AdapterExists(AdapterError):
    """The custom model id is taken."""


@dataclass(frozen=True)
class LoraSupport:
    """What a base model's engine accepts: its maximum LoRA rank and the modules LoRA was built for."""

    max_rank: int
    target_modules: tuple[str, ...] = MODULES


@dataclass(frozen=True)
class StoredAdapter:
    id: str
    base_model: str
    task_id: int
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    source_sha256: str  # of the PEFT files it was made from
    created_at: str

    def tensors(self, store_root: Path) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.int32]]:
        directory = store_root / self.id
        return np.load(directory / WEIGHTS_FILE), np.load(directory / CONFIG_FILE)


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def version(self) -> int:
        """Changes whenever an adapter is added or removed (the root directory's mtime)."""
        try:
            return self.root.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def list(self) -> list[StoredAdapter]:
        if not self.root.is_dir():
            return []
        found = []
        for directory in sorted(self.root.iterdir()):
            if directory.name.startswith(".") or not (directory / METADATA_FILE).is_file():
                continue
            found.append(_read_metadata(directory / METADATA_FILE))
        return found

    def get(self, custom_id: str) -> StoredAdapter | None:
        path = self.root / custom_id / METADATA_FILE
        return _read_metadata(path) if CUSTOM_ID.match(custom_id) and path.is_file() else None

    def register(
        self, custom_id: str, base_model: str, base_checkpoint: Path, support: LoraSupport | None, adapter_dir: Path,
        reserved_ids: Collection[str] = frozenset(),
    ) -> StoredAdapter:  # fmt: skip
        if not CUSTOM_ID.match(custom_id):
            raise AdapterError(
                f"custom model id {custom_id!r} must be 1-128 letters, digits, '.', '_', ':' or '-' "
                "(starting with a letter or digit)",
                field="id",
            )
        if custom_id in reserved_ids:
            raise AdapterError(f"'{custom_id}' is the id of a served base model", field="id")
        if support is None:
            raise AdapterError(f"model '{base_model}' does not serve LoRA adapters", field="base_model")
        if (self.root / custom_id).exists():
            raise AdapterExists(f"custom model '{custom_id}' is already registered (remove it first)", field="id")
        try:
            config = ModelConfig.from_checkpoint(base_checkpoint)
            adapter = load_peft_adapter(adapter_dir, config, max_rank=support.max_rank)
        except CheckpointError as error:
            raise AdapterError(str(error), field="adapter") from error
        not_built = sorted(set(adapter.target_modules) - set(support.target_modules))
        if not_built:
            names = [f"{m} ({TRTLLM_MODULES[m][0]})" for m in not_built]
            raise AdapterError(
                f"the adapter targets {names}, which the engine of '{base_model}' was not built with LoRA for "
                f"(it has {list(support.target_modules)})",
                field="adapter",
            )
        weights, lora_config = to_trtllm(adapter)
        digest = hashlib.sha256(weights.tobytes() + lora_config.tobytes()).digest()
        stored = StoredAdapter(
            id=custom_id,
            base_model=base_model,
            task_id=int.from_bytes(digest[:8], "big") >> 1,  # a positive int64 as well as a uint64
            rank=adapter.rank,
            alpha=adapter.alpha,
            target_modules=adapter.target_modules,
            source_sha256=_files_sha256(adapter_dir),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            np.save(staging / WEIGHTS_FILE, weights)
            np.save(staging / CONFIG_FILE, lora_config)
            (staging / METADATA_FILE).write_text(json.dumps(asdict(stored), indent=2) + "\n")
            try:
                staging.rename(self.root / custom_id)  # atomic; fails if another registration won the race
            except OSError:
                raise AdapterExists(f"custom model '{custom_id}' is already registered", field="id") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return stored

    def remove(self, custom_id: str) -> bool:
        if self.get(custom_id) is None:
            return False
        doomed = self.root / f".removing-{uuid.uuid4().hex}"
        try:
            (self.root / custom_id).rename(doomed)
        except FileNotFoundError:
            return False  # removed by someone else meanwhile
        shutil.rmtree(doomed, ignore_errors=True)
        return True


def _read_metadata(path: Path) -> StoredAdapter:
    values = json.loads(path.read_text())
    values["target_modules"] = tuple(values["target_modules"])
    return StoredAdapter(**values)


def _files_sha256(adapter_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update((adapter_dir / name).read_bytes())
    return digest.hexdigest()
