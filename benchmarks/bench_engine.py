"""CPU engine throughput next to Hugging Face transformers, on the SmolLM2 reference checkpoint.

Each configuration runs in its own process so its peak memory (max RSS) is its own. Every sequence
generates exactly --new-tokens tokens (no early stop) from prompts of different lengths, greedy;
tokens/s counts generated tokens over wall time, prefill included. Best of --repeats runs.

    make bench-engine                       # or: .venv/bin/python benchmarks/bench_engine.py [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cpu_engine.blas import CORETYPE_VARIABLE, blas_environment  # noqa: E402
from tests.prompts import VARIED_PROMPTS  # noqa: E402


def _prompts(checkpoint: Path, batch: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    return [tokenizer.encode(VARIED_PROMPTS[i % len(VARIED_PROMPTS)]).ids for i in range(batch)]


def _run_engine(checkpoint: Path, batch: int, new_tokens: int, repeats: int) -> float:
    from cpu_engine import Engine, EngineLimits, GenerationRequest, SamplingParams

    engine = Engine.from_checkpoint(checkpoint, EngineLimits(max_batch_size=max(batch, 16)))
    prompts = _prompts(checkpoint, batch)
    best = 0.0
    for attempt in range(repeats):
        requests = [
            GenerationRequest(f"{attempt}-{i}", tuple(p), new_tokens, SamplingParams(temperature=0.0))
            for i, p in enumerate(prompts)
        ]
        start = time.perf_counter()
        results = engine.generate(requests)
        elapsed = time.perf_counter() - start
        best = max(best, sum(len(r.token_ids) for r in results.values()) / elapsed)
    return best


def _run_transformers(checkpoint: Path, batch: int, new_tokens: int, repeats: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    prompts = _prompts(checkpoint, batch)
    width = max(len(p) for p in prompts)
    # Left padding, as batched generation requires.
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    best = 0.0
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
            elapsed = time.perf_counter() - start
            best = max(best, (out.shape[1] - width) * batch / elapsed)
    return best


def worker(args: argparse.Namespace) -> None:
    run = _run_engine if args.worker == "engine" else _run_transformers
    tokens_per_s = run(args.checkpoint, args.batch, args.new_tokens, args.repeats)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens_per_s": tokens_per_s, "peak_mib": peak_mib}))


def blas_description() -> str:
    """Which BLAS kernel numpy runs here: OPENBLAS_CORETYPE can pin an older one than the CPU supports."""
    import numpy  # noqa: F401  (loads OpenBLAS so threadpoolctl can see it)
    from threadpoolctl import threadpool_info

    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    if not pools:
        return "unknown BLAS"
    pool = pools[0]
    return (
        f"{pool['internal_api']} {pool['version']} ({pool.get('architecture')} kernel, {pool['num_threads']} threads)"
    )


def use_best_blas_kernel() -> None:
    """Run this benchmark again with OPENBLAS_CORETYPE set where OpenBLAS fell back to a generic kernel on a
    capable CPU (the kernel is chosen when numpy loads; workers inherit the variable)."""
    env = blas_environment(os.environ)
    if env.get(CORETYPE_VARIABLE) != os.environ.get(CORETYPE_VARIABLE):
        print(f"  OpenBLAS fell back to a generic kernel: running with {CORETYPE_VARIABLE}={env[CORETYPE_VARIABLE]}")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    use_best_blas_kernel()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", choices=["engine", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpoint is None:
        from build_engines.reference_model import ensure_reference_checkpoint

        args.checkpoint = ensure_reference_checkpoint()
    if args.worker:
        worker(args)
        return

    configs = [("transformers.generate", "transformers", 1), ("transformers.generate", "transformers", 16)]
    configs += [("cpu_engine", "engine", b) for b in (1, 2, 4, 16)]
    rows = []
    for label, kind, batch in configs:
        command = [
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--batch",
            str(batch),
            "--checkpoint",
            str(args.checkpoint),
        ]
        command += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        rows.append((label, batch, result["tokens_per_s"], result["peak_mib"]))
        print(f"  {label} batch={batch}: {result['tokens_per_s']:.1f} tokens/s", file=sys.stderr)

    hf_single = next(r[2] for r in rows if r[0] == "transformers.generate" and r[1] == 1)
    ours_single = next(r[2] for r in rows if r[0] == "cpu_engine" and r[1] == 1)
    setup = f"greedy, {args.new_tokens} new tokens per sequence, best of {args.repeats}"
    print(f"\nSmolLM2-135M-Instruct (float32), {setup}; numpy BLAS: {blas_description()}\n")
    print("| implementation | sequences | tokens/s | vs transformers 1 seq | vs cpu_engine 1 seq | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, batch, tps, peak in rows:
        print(f"| {label} | {batch} | {tps:.1f} | {tps / hf_single:.2f}x | {tps / ours_single:.2f}x | {peak:.0f} |")


if __name__ == "__main__":
    main()
