"""The dense products of one decode step alone, for 1 to 16 rows: the ceiling of batched speed-up.

Runs the CPU engine's own products (`_linear` over every layer's fused weights, then the LM head) on the
SmolLM2 checkpoint's real weights, with nothing else in the step (no attention, norms or sampling), and
prints the time per step, per generated token, and the speed-up over one row. Whatever the rest of the
engine does, N sequences cannot beat one sequence by more than that speed-up.

    .venv/bin/python benchmarks/bench_dense_products.py [--runs 8]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.bench_engine import blas_description, use_best_blas_kernel  # noqa: E402
from build_engines.reference_model import ensure_reference_checkpoint  # noqa: E402
from cpu_engine.model import LlamaModel, _linear, _vocab_logits  # noqa: E402


def step_seconds(model: LlamaModel, rows: int, whole_head: bool, rng: np.random.Generator) -> float:
    hidden = rng.standard_normal((rows, model.config.hidden_size)).astype(np.float32)
    activated = rng.standard_normal((rows, model.config.intermediate_size)).astype(np.float32)
    attention = rng.standard_normal((rows, model.q_width)).astype(np.float32)
    start = time.perf_counter()
    for layer in model.layers:
        _linear(hidden, layer.qkv)
        _linear(attention, layer.out)
        _linear(hidden, layer.gate_up)
        _linear(activated, layer.down)
    if whole_head:
        np.ascontiguousarray(_linear(hidden, model.lm_head))
    else:
        _vocab_logits(hidden, model.lm_head)
    return time.perf_counter() - start


def main() -> None:
    use_best_blas_kernel()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8, help="timed runs per cell (medians; two more to warm up)")
    args = parser.parse_args()
    model = LlamaModel.from_checkpoint(ensure_reference_checkpoint())
    rng = np.random.default_rng(0)
    cells: dict[tuple[int, bool], float] = {}
    for rows in (1, 2, 4, 8, 16):
        for whole_head in (False, True):
            times = [step_seconds(model, rows, whole_head, rng) for _ in range(args.runs + 2)][2:]
            cells[rows, whole_head] = float(np.median(times))
    one = cells[1, False]
    print(f"\nSmolLM2 dense products per decode step (30 layers + LM head), float32; numpy BLAS: {blas_description()}")
    print(f"medians of {args.runs} runs; the engine's path takes the head in chunks\n")
    print("| rows | ms per step | ms per token | speed-up over 1 row (ceiling) | same, head in one product, ms |")
    print("|---:|---:|---:|---:|---:|")
    for rows in (1, 2, 4, 8, 16):
        seconds = cells[rows, False]
        print(
            f"| {rows} | {seconds * 1e3:.1f} | {seconds * 1e3 / rows:.2f} | {rows * one / seconds:.2f}x | "
            f"{cells[rows, True] * 1e3:.1f} |"
        )


if __name__ == "__main__":
    main()
