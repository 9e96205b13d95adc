"""The OpenBLAS kernel check: a generic fallback kernel on a capable CPU is named, reported and replaced for the
processes started afterwards; a kernel OpenBLAS chose for a CPU it recognised is left alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from build_engines.repository import RepositorySettings, render_repository
from build_engines.tiny_checkpoints import TokenizerStyle
from cpu_engine.blas import CORETYPE_VARIABLE, better_coretype, blas_environment, cpu_flags
from triton_models import tensors as t
from triton_models.launcher import EmbeddedTriton


def _flags(line: str) -> frozenset[str]:
    return frozenset(line.split())


# /proc/cpuinfo flags (the relevant part) of CPUs OpenBLAS may not recognise inside a virtual machine.
SAPPHIRE_RAPIDS = _flags("sse3 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 amx_tile amx_bf16")
ZEN4 = _flags("sse3 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16")
SKYLAKE_SERVER = _flags("sse3 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl")
HASWELL = _flags("sse3 avx avx2 fma")


@pytest.mark.parametrize(
    ("flags", "kernel"),
    [(SAPPHIRE_RAPIDS, "SapphireRapids"), (ZEN4, "Cooperlake"), (SKYLAKE_SERVER, "SkylakeX"), (HASWELL, "Haswell"),
     (frozenset({"sse3", "avx"}), "Sandybridge"), (frozenset({"sse3"}), None)],
)  # fmt: skip
def test_a_generic_kernel_is_replaced_by_the_best_the_flags_allow(flags: frozenset[str], kernel: str | None) -> None:
    assert better_coretype("Prescott", flags) == kernel
    assert better_coretype("NEHALEM", flags) == kernel  # OpenBLAS's spelling varies; any generic kernel counts


@pytest.mark.parametrize("recognised", ["Haswell", "Zen", "SkylakeX", "Cooperlake"])
def test_a_kernel_chosen_for_a_recognised_cpu_is_kept(recognised: str) -> None:
    assert better_coretype(recognised, SAPPHIRE_RAPIDS) is None
    assert better_coretype(None, SAPPHIRE_RAPIDS) is None  # not OpenBLAS: nothing to say


def test_cpu_flags_are_read_from_the_first_cpu(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse3 avx2\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse3", "avx2"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def _probe(environ: dict[str, str]) -> dict[str, object]:
    """The kernel check as a fresh process sees it (the kernel is chosen when numpy loads)."""
    code = (
        "import json; from cpu_engine.blas import *; "
        "print(json.dumps({'core': openblas_core(), 'warning': generic_kernel_warning(), "
        "'env': blas_environment({}).get(CORETYPE_VARIABLE)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_a_forced_generic_kernel_is_detected_and_named_in_a_warning() -> None:
    probe = _probe({**os.environ, CORETYPE_VARIABLE: "Prescott"})
    assert probe["core"] == "Prescott"  # read from the loaded OpenBLAS itself
    expected = better_coretype("Prescott", cpu_flags())
    if expected is None:  # a CPU without AVX: Prescott is the right kernel
        assert probe["warning"] is None
    else:
        assert isinstance(probe["warning"], str)
        assert "generic Prescott kernel" in probe["warning"] and f"{CORETYPE_VARIABLE}={expected}" in probe["warning"]
        # The environment for child processes names the better kernel (the variable was not set for them).
        assert probe["env"] == expected


def test_a_kernel_set_by_the_user_is_left_alone() -> None:
    assert blas_environment({CORETYPE_VARIABLE: "Haswell"}) == {CORETYPE_VARIABLE: "Haswell"}
    native = _probe({k: v for k, v in os.environ.items() if k != CORETYPE_VARIABLE})
    # Whatever OpenBLAS chose for this CPU by itself is replaced only if it is a generic fallback.
    assert native["env"] == better_coretype(str(native["core"]), cpu_flags())


def test_the_generation_model_warns_in_the_server_log_about_a_generic_kernel(
    tiny_checkpoints: dict[TokenizerStyle, Path], tmp_path: Path
) -> None:
    if better_coretype("Prescott", cpu_flags()) is None:
        pytest.skip("this CPU has no AVX: the generic kernel is the right one")
    checkpoint = next(iter(tiny_checkpoints.values()))
    rendered = render_repository(RepositorySettings(checkpoint_dir=str(checkpoint)), tmp_path / "rendered")
    repository = tmp_path / "repository"  # the generation model alone: its start-up is what is checked
    shutil.copytree(rendered / t.CPU_LLM, repository / t.CPU_LLM)
    server = EmbeddedTriton(repository, log_path=tmp_path / "triton.log", env={CORETYPE_VARIABLE: "Prescott"})
    with server:
        log = server.log_text()
    assert f"{t.CPU_LLM}: numpy's OpenBLAS runs its generic Prescott kernel" in log
