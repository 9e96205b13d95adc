"""Custom models on a shared engine: throughput of a batch that mixes LoRA adapters, next to the base model alone.

One engine (the SmolLM2 reference, CPU), one process; the configurations alternate round by round so that
machine noise hits them alike, and each reports its median. Every sequence generates exactly --new-tokens
tokens, greedy; tokens/s counts generated tokens over wall time, prefill included. Adapters are rank
--rank on all seven Llama modules (q k v o gate up down), random weights, applied as the engine applies them
in serving (base products once for the whole batch, each adapter's low-rank products over its own rows).

    make bench-lora                          # or: .venv/bin/python benchmarks/bench_lora.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_engine import use_best_blas_kernel  # noqa: E402
from tests.prompts import VARIED_PROMPTS  # noqa: E402


def random_adapter(config: object, rank: int, seed: int) -> object:
    from cpu_engine.lora import MODULES, LoraAdapter, LoraModule, module_shapes

    rng = np.random.default_rng(seed)
    shapes = module_shapes(config)  # type: ignore[arg-type]
    layers = tuple(
        {
            name: LoraModule(
                (rng.standard_normal((rank, shapes[name][1])) * 0.02).astype(np.float32),
                (rng.standard_normal((shapes[name][0], rank)) * 0.02).astype(np.float32),
            )
            for name in MODULES
        }
        for _ in range(config.num_layers)  # type: ignore[attr-defined]
    )
    return LoraAdapter(rank=rank, alpha=float(rank), target_modules=MODULES, layers=layers)


def main() -> None:
    use_best_blas_kernel()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="sequences generated together")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from tokenizers import Tokenizer

    from build_engines.reference_model import ensure_reference_checkpoint
    from cpu_engine import Engine, EngineLimits, GenerationRequest, ModelConfig, SamplingParams

    checkpoint = ensure_reference_checkpoint()
    engine = Engine.from_checkpoint(checkpoint, EngineLimits(max_batch_size=args.batch))
    config = ModelConfig.from_checkpoint(checkpoint)
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    prompts = [tuple(tokenizer.encode(VARIED_PROMPTS[i % len(VARIED_PROMPTS)]).ids) for i in range(args.batch)]
    adapters = [random_adapter(config, args.rank, seed) for seed in range(4)]
    mixes = {
        "base model alone": [None] * args.batch,
        "1 adapter (every sequence)": [adapters[0]] * args.batch,
        "4 adapters mixed": [adapters[i % 4] for i in range(args.batch)],
        "4 adapters + base mixed": [[*adapters, None][i % 5] for i in range(args.batch)],
    }
    measured: dict[str, list[float]] = {name: [] for name in mixes}
    greedy = SamplingParams(temperature=0.0)
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for name, mix in mixes.items():
            requests = [
                GenerationRequest(f"{round_index}-{i}", p, args.new_tokens, greedy, adapter=a)  # type: ignore[arg-type]
                for i, (p, a) in enumerate(zip(prompts, mix, strict=True))
            ]
            start = time.perf_counter()
            results = engine.generate(requests)
            elapsed = time.perf_counter() - start
            if round_index:
                measured[name].append(sum(len(r.token_ids) for r in results.values()) / elapsed)
        print(f"  round {round_index}/{args.rounds} done", file=sys.stderr)

    base = statistics.median(measured["base model alone"])
    print(
        f"\nSmolLM2-135M-Instruct (float32, CPU engine), {args.batch} sequences together, {args.new_tokens} new tokens "
        f"each, greedy; LoRA rank {args.rank} on all 7 modules; median of {args.rounds} interleaved rounds\n"
    )
    print("| batch | tokens/s (median) | min-max | vs base model alone |")
    print("|---|---:|---:|---:|")
    for name, values in measured.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {min(values):.1f}-{max(values):.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
