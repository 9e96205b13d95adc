"""Streamed tokens/s through Triton (gRPC streaming, the ensemble) next to the CPU engine called in-process.

Same prompts, same batch sizes, greedy, every sequence generates exactly --new-tokens tokens
(min_tokens = max_tokens); the ratio is the cost of Triton, the ensemble (pre/postprocessing per
response) and gRPC. Best of --repeats runs.

    make bench-triton        # or: .venv/bin/python benchmarks/bench_triton.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_engine import blas_description, use_best_blas_kernel  # noqa: E402
from build_engines.reference_model import ensure_reference_checkpoint  # noqa: E402
from build_engines.repository import RepositorySettings, render_repository  # noqa: E402
from cpu_engine import Engine, EngineLimits, GenerationRequest, SamplingParams  # noqa: E402
from tests.prompts import VARIED_PROMPTS  # noqa: E402
from tests.triton_client import StreamingClient, ensemble_inputs  # noqa: E402
from triton_models import tensors as t  # noqa: E402
from triton_models.launcher import EmbeddedTriton  # noqa: E402


def _prompts(count: int) -> list[str]:
    return [VARIED_PROMPTS[i % len(VARIED_PROMPTS)] for i in range(count)]


def through_triton(server: EmbeddedTriton, streams: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(tokens/s, mean time to first token in s) with `streams` concurrent streaming requests."""
    client = StreamingClient(server.grpc_url)
    best, best_ttft = 0.0, 0.0
    try:
        for attempt in range(repeats):
            ids = {f"{attempt}-{i}" for i in range(streams)}
            start = time.perf_counter()
            first_token: dict[str, float] = {}
            for rid, prompt in zip(sorted(ids), _prompts(streams), strict=True):
                options = {"temperature": 0.0, t.MIN_TOKENS: new_tokens}
                client.send(t.ENSEMBLE, ensemble_inputs(prompt, new_tokens, True, **options), rid)
            tokens = 0
            pending = set(ids)
            while pending:
                result, error = client.responses.get(timeout=300)
                if error is not None:
                    raise RuntimeError(error)
                response = result.get_response()
                first_token.setdefault(response.id, time.perf_counter() - start)
                count = result.as_numpy(t.OUTPUT_TOKEN_COUNT)
                tokens += 0 if count is None else int(count.sum())
                if response.parameters["triton_final_response"].bool_param:
                    pending.discard(response.id)
            elapsed = time.perf_counter() - start
            if tokens / elapsed > best:
                best, best_ttft = tokens / elapsed, sum(first_token.values()) / len(first_token)
    finally:
        client.close()
    return best, best_ttft


def in_process(engine: Engine, tokenizer_path: Path, streams: int, new_tokens: int, repeats: int) -> float:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    best = 0.0
    for attempt in range(repeats):
        requests = [
            GenerationRequest(
                f"{attempt}-{i}", tuple(tokenizer.encode(p).ids), new_tokens, SamplingParams(temperature=0.0)
            )
            for i, p in enumerate(_prompts(streams))
        ]
        start = time.perf_counter()
        results = engine.generate(requests)
        best = max(best, sum(len(r.token_ids) for r in results.values()) / (time.perf_counter() - start))
    return best


def main() -> None:
    use_best_blas_kernel()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    checkpoint = ensure_reference_checkpoint()
    settings = RepositorySettings(checkpoint_dir=str(checkpoint))
    concurrency = (1, 4, 16)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        repo = render_repository(settings, Path(workdir) / "repository")
        with EmbeddedTriton(repo, log_path=Path(workdir) / "triton.log") as server:
            through_triton(server, 1, 4, 1)  # warm-up
            triton = {c: through_triton(server, c, args.new_tokens, args.repeats) for c in concurrency}
        limits = EngineLimits(max_batch_size=settings.engine_max_batch_size, max_num_tokens=settings.max_num_tokens)
        engine = Engine.from_checkpoint(checkpoint, limits)
        direct = {
            c: in_process(engine, checkpoint / "tokenizer.json", c, args.new_tokens, args.repeats) for c in concurrency
        }
    for c in concurrency:
        rows.append((c, triton[c][0], direct[c], triton[c][0] / direct[c], triton[c][1]))
    setup = f"greedy, {args.new_tokens} tokens per stream, best of {args.repeats}; numpy BLAS: {blas_description()}"
    print(f"\nSmolLM2-135M-Instruct, {setup}\n")
    print("| streams | via Triton tokens/s | in-process tokens/s | ratio | TTFT via Triton ms |")
    print("|---:|---:|---:|---:|---:|")
    for c, via_triton, local, ratio, ttft in rows:
        print(f"| {c} | {via_triton:.1f} | {local:.1f} | {ratio:.2f}x | {ttft * 1000:.0f} |")


if __name__ == "__main__":
    main()
