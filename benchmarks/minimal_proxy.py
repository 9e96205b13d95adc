"""The least an aiohttp front end to Triton can do per request, as a floor for `bench_gateway.py`: read the
JSON body, send the ensemble request on the gateway's own gRPC leg (`TritonEndpoint.stream`, the same
channel options and request tensors) and write each response as an SSE event carrying what the benchmark
reads from the gateway's events (the text, then the usage at the end; the spec's other fields are left out).

Nothing else: no validation, token counting, admission, stop sequences, deadlines, metrics, logs or usage
ledger. Not a server to use; it shows what the architecture (a Python process between the client and
Triton, speaking SSE on one side and gRPC on the other) costs on a machine, so the gateway's own share can
be read off the same benchmark run.

    .venv/bin/python -m benchmarks.minimal_proxy --port 8090 --triton 127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json

from aiohttp import web

from gateway.event_loop import DEFAULT_EVENT_LOOP, run
from gateway.triton_channel import TritonEndpoint
from gateway.triton_translation import GenerationPlan, ensemble_request
from triton_models import tensors as t

READY_LINE = "ready"  # printed on stdout once the port is open


async def serve(port: int, triton: str, ensemble: str) -> None:
    endpoint = TritonEndpoint(triton)
    request_ids = itertools.count()

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        plan = GenerationPlan(
            prompt=body["prompt"], prompt_tokens=0, max_tokens=body["model_parameters"]["max_tokens"],
            temperature=0.0, top_k=None, top_p=None, presence_penalty=0.0, frequency_penalty=0.0,
            stop_sequences=(),
        )  # fmt: skip
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        tokens = 0
        async for chunk in endpoint.stream(ensemble_request(ensemble, f"proxy-{next(request_ids)}", plan)):
            tokens += chunk.tokens
            if chunk.data:
                text = json.dumps(chunk.data.decode("utf-8", "replace"))
                await response.write(f'data: {{"completion":{{"text":{text}}},"token_usage":null}}\n\n'.encode())
        usage = json.dumps({"prompt": 0, "completion": tokens, "total": tokens})
        await response.write(f'data: {{"completion":{{"text":""}},"token_usage":{usage}}}\n\n'.encode())
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v4/completions", complete)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(READY_LINE, flush=True)
    try:
        await asyncio.Event().wait()  # until the benchmark terminates the process
    finally:
        await runner.cleanup()
        await endpoint.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--triton", required=True, help="Triton's gRPC address, host:port")
    parser.add_argument("--ensemble", default=t.ENSEMBLE)
    args = parser.parse_args()
    run(serve(args.port, args.triton, args.ensemble), DEFAULT_EVENT_LOOP)


if __name__ == "__main__":
    main()
