"""Which OpenBLAS kernel numpy runs, and a better one where OpenBLAS fell back to a generic kernel.

OpenBLAS picks its kernels from the CPU's model number. A virtual machine that hides the model (cloud VMs
that report "Intel(R) Xeon(R) Processor") gets the generic Prescott kernel (SSE3, no AVX), although the
CPU has AVX-512. On such a 16-core VM (Sapphire Rapids flags) OPENBLAS_CORETYPE=SapphireRapids made the CPU
engine 1.9x faster for one sequence and 3.0x for sixteen (README).

The kernel is fixed when the library loads, so the better one is named in OPENBLAS_CORETYPE for the
processes started afterwards (the Triton server's model processes, benchmark workers). An
OPENBLAS_CORETYPE that is already set is the user's choice and is left alone.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

CORETYPE_VARIABLE = "OPENBLAS_CORETYPE"

# OpenBLAS's x86-64 kernels without AVX: what it falls back to for a CPU model it does not know.
_GENERIC_CORES = frozenset(
    {"prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "katmai", "coppermine", "northwood",
     "banias", "opteron", "opteron_sse3", "barcelona", "bobcat", "nano"}
)  # fmt: skip

# The best kernel a CPU's /proc/cpuinfo flags allow, most capable first (names as OPENBLAS_CORETYPE takes them).
_KERNELS_BY_FLAGS: tuple[tuple[str, frozenset[str]], ...] = (
    ("SapphireRapids", frozenset({"avx512f", "avx512vl", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16"})),
    ("Cooperlake", frozenset({"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512_bf16"})),
    ("SkylakeX", frozenset({"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512cd"})),
    ("Haswell", frozenset({"avx2", "fma"})),
    ("Sandybridge", frozenset({"avx"})),
)


def better_coretype(current_core: str | None, flags: frozenset[str]) -> str | None:
    """The kernel to name in OPENBLAS_CORETYPE, or None to keep OpenBLAS's own choice.

    Only a generic fallback kernel is replaced: where OpenBLAS recognised the CPU its choice stands."""
    if current_core is None or current_core.lower() not in _GENERIC_CORES:
        return None
    for kernel, needed in _KERNELS_BY_FLAGS:
        if needed <= flags:
            return kernel
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo does not exist, e.g. not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def openblas_core() -> str | None:
    """The kernel numpy's OpenBLAS runs in this process ("Haswell", "Prescott", ...); None if not OpenBLAS."""
    import numpy  # noqa: F401  (loads numpy's BLAS)

    path = _loaded_openblas()
    if path is None:
        return None
    library = ctypes.CDLL(path)
    # numpy's wheels build OpenBLAS with 64-bit integers and a symbol suffix (numpy 1.x) or prefix (2.x).
    for symbol in ("openblas_get_corename64_", "scipy_openblas_get_corename64_", "openblas_get_corename"):
        function = getattr(library, symbol, None)
        if function is not None:
            function.restype = ctypes.c_char_p
            name = function()
            return name.decode() if name else None
    return None


def _loaded_openblas() -> str | None:
    """The path of the OpenBLAS library mapped into this process (Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and "openblas" in Path(fields[5]).name.lower():
            return fields[5].strip()
    return None


def _generic_fallback() -> tuple[str, str] | None:
    """(the generic kernel this process runs, the better one the CPU allows), or None."""
    current = openblas_core()
    kernel = better_coretype(current, cpu_flags())
    return None if current is None or kernel is None else (current, kernel)


def generic_kernel_warning() -> str | None:
    """A warning for the log when this process runs a generic kernel that the CPU could do better than."""
    fallback = _generic_fallback()
    if fallback is None:
        return None
    current, kernel = fallback
    return (
        f"numpy's OpenBLAS runs its generic {current} kernel on a CPU that supports {kernel}'s "
        f"(typical of virtual machines that hide the CPU model); generation can be several times slower: "
        f"start the server with {CORETYPE_VARIABLE}={kernel}"
    )


def blas_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` plus OPENBLAS_CORETYPE where OpenBLAS fell back to a generic kernel on a capable CPU."""
    env = dict(environ)
    if CORETYPE_VARIABLE in env:
        return env
    fallback = _generic_fallback()
    if fallback is not None:
        log.info("OpenBLAS chose the generic %s kernel for this CPU; child processes use %s", *fallback)
        env[CORETYPE_VARIABLE] = fallback[1]
    return env
