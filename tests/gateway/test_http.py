"""The gateway over plain HTTP (aiohttp client): errors, concurrency, disconnects, health, limits."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.replicas import SharedCheck
from tests.gateway.conftest import MODEL, GatewayThread, RunningGateway, gateway_settings, model_entry, raw_post
from tests.prompts import SMOLLM_CHAT, VARIED_PROMPTS
from tests.triton_client import metric_value, wait_for_metric
from triton_models.launcher import EmbeddedTriton, free_port

FRANCE = SMOLLM_CHAT.format("What is the capital of France?")


async def _post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with session.post(f"{url}/v4/completions", data=data, headers=headers) as response:
            return response.status, response.headers.copy(), await response.json(content_type=None)


async def _stream_text(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    async with session.post(f"{url}/v4/completions", json={**body, "stream": True}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text, last = "", {}
        async for line in response.content:
            if line.startswith(b"data: "):
                last = json.loads(line[len(b"data: ") :])
                text += last["completion"]["text"]
        return text, last


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    return asyncio.run(_post(url, body, headers))


BAD_REQUESTS = [
    (b"{not json", 400, "not valid JSON", None),
    (b"[1, 2]", 400, "JSON object", None),
    ({"prompt": "hi"}, 400, "model", "model"),
    ({"model": MODEL}, 400, "prompt", "prompt"),
    ({"model": MODEL, "prompt": ""}, 400, "prompt must not be empty", "prompt"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt", "prompt"),
    ({"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream", "stream"),
    ({"model": MODEL, "prompt": "hi", "model_parameters": {"temperature": "hot"}}, 400, "temperature", None),
    ({"model": MODEL, "prompt": "hi", "model_parameters": {"temperature": 2.5}}, 400, "temperature", None),
    ({"model": MODEL, "prompt": "hi", "model_parameters": {"max_tokens": 0}}, 400, "max_tokens", None),
    ({"model": MODEL, "prompt": "hi", "model_parameters": {"topK": -1}}, 400, "topK", None),
    ({"model": MODEL, "prompt": "hi", "model_parameters": {"top_p": 0}}, 400, "top_p", None),
    ({"model": MODEL, "prompt": "hi", "model_parameters": {"frequency_penalty": 3}}, 400, "frequency_penalty", None),
    ({"model": MODEL, "prompt": "hi", "model_parameters": {"presence_penalty": -3}}, 400, "presence_penalty", None),
    ({"model": MODEL, "prompt": "hi", "model_parameters": {"stop_sequences": ["a"] * 5}}, 400, "stop_sequences", None),
    ({"model": MODEL, "prompt": "hi", "model_parameters": {"stop_sequences": [""]}}, 400, "stop_sequences", None),
    ({"model": MODEL, "prompt": "hi", "model_parameters": {"max_tokens": 9000}}, 400, "(1) + max_tokens (9000)", None),
    ({"model": MODEL, "prompt": "hi", "images": [{"image_url": "data:,"}]}, 400, "does not accept images", "images"),
    ({"model": "gpt-nope", "prompt": "hi"}, 404, "gpt-nope", "model"),
    # Hostile bodies: each a 400 naming the problem, never a 500.
    (b'{"model": "m", "prompt": "caf\xe9"}', 400, "not valid UTF-8 (byte 29)", None),
    (b"[" * 20_000 + b"]" * 20_000, 400, "nested too deeply", None),
    (
        b'{"model": "m", "prompt": "hi", "model_parameters": {"max_tokens": ' + b"9" * 5000 + b"}}",
        400,
        "Exceeds the limit (4300 digits)",
        None,
    ),
    (b'{"model": "m", "prompt": "hi", "model_parameters": {"temperature": 1e999}}', 400, "temperature", None),
    ({"model": MODEL, "prompt": "hi", "model_parameters": {"max_tokens": 10**30}}, 400, "model's context", None),
    ({"model": MODEL, "prompt": "a\u0000b"}, 400, "must not contain NUL", "prompt"),
    ({"model": MODEL, "prompt": "hi", "model_parameters": {"top_k": 2**40}}, 400, "top_k", None),  # fuzzing
    ({"model": MODEL, "prompt": "\u0016"}, 400, "no tokens for this model's tokenizer", "prompt"),  # found by fuzzing
    ({"model": MODEL, "prompt": "hi", "model_parameters": {"stop_sequences": ["\u0000"]}}, 400, "NUL", None),
    # JSON escapes of unpaired surrogates: valid JSON, not text (found by review; were 500s, or a poisoned ledger).
    ({"model": MODEL, "prompt": "hi \ud800"}, 400, "unpaired UTF-16 surrogate", "prompt"),
    (
        {"model": MODEL, "prompt": "hi", "model_parameters": {"stop_sequences": ["ok", "\udc00"]}},
        400,
        "unpaired UTF-16 surrogate",
        "model_parameters.stop_sequences.1",
    ),
    ({"model": MODEL, "prompt": "hi", "account_id": "a\ud800"}, 400, "unpaired UTF-16 surrogate", "account_id"),
]


@pytest.mark.parametrize(("body", "status", "message", "param"), BAD_REQUESTS)
def test_bad_input_gets_its_status_and_a_json_body_naming_the_problem(
    gateway: RunningGateway, body: Any, status: int, message: str, param: str | None
) -> None:
    code, headers, payload = post(gateway.url, body, {"x-request-id": "client-id-7"})
    assert code == status
    error = payload["error"]
    assert error["status"] == status and message in error["message"]
    if param is not None:
        assert error["param"] == param
    assert error["request_id"] == "client-id-7" == headers["x-request-id"]


def test_over_the_context_names_both_numbers(gateway: RunningGateway) -> None:
    # "hello " * 100 is 101 tokens: 100 words and the trailing space.
    code, _, payload = post(
        gateway.url, {"model": MODEL, "prompt": "hello " * 100, "model_parameters": {"max_tokens": 8100}}
    )
    assert code == 400
    assert (
        "prompt tokens (101) + max_tokens (8100) = 8201 exceeds the model's context length of 8192"
        in payload["error"]["message"]
    )


def test_long_prompts_are_tokenized_without_stalling_other_streams(
    reference_triton: EmbeddedTriton, reference_checkpoint: Path
) -> None:
    """Three ~1 MB prompts (over the context: 400s naming both numbers) while a stream runs: their tokenizing
    (≈0.6 s each here) runs beside the stream's events instead of stopping them."""
    words = [f"w{i % 9973}x{i % 7}" for i in range(120_000)]  # few repeats: the tokenizer's cache cannot help
    settings = gateway_settings([model_entry(reference_checkpoint, reference_triton.grpc_url)])
    with GatewayThread(settings) as running:

        async def scenario() -> tuple[float, list[tuple[int, Any]]]:
            async with aiohttp.ClientSession() as session:
                body = {"model": MODEL, "prompt": FRANCE, "stream": True,
                        "model_parameters": {"temperature": 0, "max_tokens": 48}}  # fmt: skip
                async with session.post(f"{running.url}/v4/completions", json=body) as response:
                    arrivals = []
                    big = [
                        asyncio.ensure_future(_post(running.url, {"model": MODEL, "prompt": " ".join(words[i:])}))
                        for i in range(3)
                    ]
                    async for line in response.content:
                        if line.startswith(b"data: "):
                            arrivals.append(time.monotonic())
                    answers = [(status, payload) for status, _, payload in await asyncio.gather(*big)]
            return max(b - a for a, b in itertools.pairwise(arrivals)), answers

        longest_gap, answers = asyncio.run(scenario())
    for status, payload in answers:
        assert status == 400 and "leaves no room in the model's context length of 8192" in payload["error"]["message"]
    # Measured: 0.04-0.16 s; with the tokenizing on the event loop, 1.1 s.
    assert longest_gap < 0.6


def test_oversized_body_is_413(gateway: RunningGateway) -> None:
    code, _, payload = post(gateway.url, {"model": MODEL, "prompt": "x" * 70000})
    assert code == 413
    assert payload["error"]["type"] == "payload_too_large"


def _answer_to_unfinished_request(url: str, *parts: bytes, timeout_s: float) -> tuple[bytes, float]:
    """Send a request in parts on a raw socket (a pause between them, so the handler is reading when the next
    one arrives): the first bytes of the answer, and how long they took after the last part."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as client:
        for index, part in enumerate(parts):
            if index:
                time.sleep(0.3)
            client.sendall(part)
        started = time.monotonic()
        return client.recv(4096), time.monotonic() - started


def test_a_body_declared_too_large_is_413_before_it_is_sent(gateway: RunningGateway) -> None:
    """A client announcing a gigabyte gets its 413 at once: the gateway does not wait for (or read) the body."""
    answer, seconds = _answer_to_unfinished_request(
        gateway.url, b"POST /v4/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n{", timeout_s=5,
    )  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 413") and b"payload_too_large" in answer
    assert seconds < 2


def test_a_body_that_never_finishes_arriving_is_held_to_the_deadline(gateway: RunningGateway) -> None:
    answer, seconds = _answer_to_unfinished_request(
        gateway.url, b"POST /v4/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"x-request-timeout: 1\r\nContent-Length: 100\r\n\r\n{\"model\": ", timeout_s=10,
    )  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 504")
    assert b"the request body did not arrive within 1 s" in answer
    assert seconds < 5


def test_compressed_bodies_decode_or_get_a_400_naming_the_encoding(gateway: RunningGateway) -> None:
    body = json.dumps({"model": MODEL, "prompt": FRANCE, "model_parameters": {"max_tokens": 2}}).encode()
    packed = gzip.compress(body)
    status, _, answer = raw_post(gateway.url, "/v4/completions", b"Content-Encoding: gzip\r\n", packed)
    assert status == 200 and answer["token_usage"]["completion"] == 2
    broken = packed[:-8] + b"\0" * 8  # a wrong CRC and length
    for encoding, data in ((b"gzip", broken), (b"gzip", body), (b"deflate", body)):
        header = b"Content-Encoding: " + encoding + b"\r\n"
        status, headers, answer = raw_post(gateway.url, "/v4/completions", header, data)
        assert status == 400 and answer["error"]["param"] == "content-encoding", (encoding, answer)
        assert f"the {encoding.decode()} body could not be decoded" in answer["error"]["message"]
        assert headers["x-request-id"]
    status, _, answer = raw_post(gateway.url, "/v4/completions", b"Content-Encoding: foo\r\n", body)
    assert status == 400 and "content-encoding 'foo' is not supported" in answer["error"]["message"]
    for headers in (b"Content-Encoding: identity\r\nContent-Encoding: gzip\r\n", b"Content-Encoding: gzip, br\r\n"):
        status, _, answer = raw_post(gateway.url, "/v4/completions", headers, packed)
        assert status == 400 and "one content-encoding, not several" in answer["error"]["message"], headers
    status, _, answer = raw_post(gateway.url, "/v4/completions", b"Content-Encoding: \r\n", body)
    assert status == 200  # an empty value is no encoding


def test_an_upload_whose_chunked_framing_breaks_is_let_go(
    reference_triton: EmbeddedTriton, reference_checkpoint: Path
) -> None:
    """aiohttp waits for more after a malformed chunk-size line: the body's own timeout ends it, not the 300 s
    deadline of the request."""
    settings = gateway_settings([model_entry(reference_checkpoint, reference_triton.grpc_url)], body_read_timeout_s=1)
    with GatewayThread(settings) as running:
        answer, seconds = _answer_to_unfinished_request(
            running.url, b"POST /v4/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\n{\"\r\n", b"zz\r\nmodel\r\n", timeout_s=10,
        )  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 504") and b"the request body did not arrive within 1 s" in answer
    assert seconds < 5


def test_the_deadline_counts_from_arrival_reading_the_body_included(gateway: RunningGateway) -> None:
    story = SMOLLM_CHAT.format("Write a long story about a brave knight and a dragon.")  # hundreds of tokens
    body = json.dumps({"model": MODEL, "prompt": story, "model_parameters": {"max_tokens": 1000}}).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as client:
        started = time.monotonic()
        client.sendall(b"POST /v4/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"x-request-timeout: 2\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")  # fmt: skip
        client.sendall(body[:10])
        time.sleep(1.2)  # most of the deadline goes on the upload
        client.sendall(body[10:])
        answer = client.recv(4096)
        answered_after = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 504") and b"deadline of 2 s" in answer
    assert answered_after < 2.8  # 2 s from arrival, not 2 s more after the upload


def test_concurrent_readiness_calls_share_one_round_of_checks() -> None:
    rounds = 0

    async def check() -> None:
        nonlocal rounds
        rounds += 1
        await asyncio.sleep(0.2)

    async def run() -> None:
        shared = SharedCheck()
        impatient = asyncio.ensure_future(shared.run(check))
        others = [asyncio.ensure_future(shared.run(check)) for _ in range(20)]
        await asyncio.sleep(0.05)
        impatient.cancel()  # a caller giving up does not cancel the round the others wait for
        await asyncio.gather(*others)
        await shared.run(check)  # a later call starts a new round

    asyncio.run(run())
    assert rounds == 2


def test_unknown_route_and_method_are_json_errors(gateway: RunningGateway) -> None:
    async def calls() -> tuple[int, Any, int, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway.url}/v4/nothing") as missing:
                first = (missing.status, await missing.json())
            async with session.get(f"{gateway.url}/v4/completions") as wrong:
                return (*first, wrong.status, await wrong.json())

    missing_status, missing, wrong_status, wrong = asyncio.run(calls())
    assert missing_status == 404 and missing["error"]["type"] == "not_found"
    assert wrong_status == 405 and wrong["error"]["type"] == "method_not_allowed"


def test_unknown_fields_are_ignored_and_request_ids_are_made(gateway: RunningGateway) -> None:
    body = {
        "model": MODEL,
        "prompt": FRANCE,
        "future_field": 1,
        "model_parameters": {"temperature": 0, "max_tokens": 8, "reasoning_effort": "low"},
    }
    code, headers, payload = post(gateway.url, body)
    assert code == 200
    assert "Paris" in payload["completion"]["text"]
    assert len(headers["x-request-id"]) == 32


def test_a_request_id_that_is_not_printable_ascii_is_replaced(gateway: RunningGateway) -> None:
    # Header values travel as bytes: a non-ASCII id would come back as different bytes than the client sent.
    status, headers, _ = raw_post(gateway.url, "/v4/completions", b"x-request-id: req-caf\xc3\xa9\r\n", b"{}")
    assert status == 400 and len(headers["x-request-id"]) == 32 and headers["x-request-id"].isalnum()


def test_gateway_stays_ready_after_bad_input(gateway: RunningGateway) -> None:
    for body, *_ in BAD_REQUESTS:
        post(gateway.url, body)

    async def ready() -> tuple[int, Any, int]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateway.url}/readyz") as response:
                ready = (response.status, await response.json())
            async with session.get(f"{gateway.url}/healthz") as health:
                return (*ready, health.status)

    status, body, health = asyncio.run(ready())
    assert (status, body["models"], health) == (200, {MODEL: True}, 200)


def test_models_are_listed(gateway: RunningGateway) -> None:
    async def models() -> Any:
        async with aiohttp.ClientSession() as session, session.get(f"{gateway.url}/v4/models") as response:
            return await response.json()

    listed = asyncio.run(models())
    assert [m["id"] for m in listed["data"]] == [MODEL]
    assert listed["data"][0]["context_length"] == 8192


def test_thirty_two_concurrent_streams_each_get_their_own_answer(gateway: RunningGateway) -> None:
    prompts = [f"{p} {i}" for i, p in enumerate((VARIED_PROMPTS * 4)[:32])]
    parameters = {"temperature": 0, "max_tokens": 10}

    async def run() -> tuple[list[str], list[str]]:
        async with aiohttp.ClientSession() as session:
            solo = [
                await _stream_text(session, gateway.url, {"model": MODEL, "prompt": p, "model_parameters": parameters})
                for p in prompts
            ]
            together = await asyncio.gather(
                *(
                    _stream_text(session, gateway.url, {"model": MODEL, "prompt": p, "model_parameters": parameters})
                    for p in prompts
                )
            )
        return [s[0] for s in solo], [t[0] for t in together]

    solo, together = asyncio.run(run())
    assert together == solo
    assert len(set(solo)) > 16  # different prompts, different answers


def test_a_client_that_disconnects_frees_the_engine(gateway: RunningGateway, reference_triton: EmbeddedTriton) -> None:
    async def leave_early() -> int:
        received = 0
        async with aiohttp.ClientSession() as session:
            body = {
                "model": MODEL,
                "prompt": VARIED_PROMPTS[1],
                "stream": True,
                "model_parameters": {"max_tokens": 2000},
            }
            async with session.post(f"{gateway.url}/v4/completions", json=body) as response:
                async for line in response.content:
                    if line.startswith(b"data: "):
                        received += 1
                    if received == 3:
                        break  # leaving the block closes the connection mid-stream
        return received

    assert asyncio.run(leave_early()) == 3
    assert metric_value(reference_triton.metrics_url, "cpu_llm_active_sequences") >= 0
    wait_for_metric(reference_triton.metrics_url, "cpu_llm_active_sequences", 0, timeout_s=1.0)
    generated = metric_value(reference_triton.metrics_url, "cpu_llm_generated_tokens_total")
    time.sleep(0.3)
    assert metric_value(reference_triton.metrics_url, "cpu_llm_generated_tokens_total") == generated


def test_unreachable_triton_is_503_and_not_ready(reference_checkpoint: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with GatewayThread(gateway_settings([model_entry(reference_checkpoint, dead)])) as running:
        code, _, payload = post(running.url, {"model": MODEL, "prompt": "hi"})
        assert code == 503
        assert payload["error"]["type"] == "service_unavailable"

        async def ready() -> int:
            async with aiohttp.ClientSession() as session, session.get(f"{running.url}/readyz") as response:
                return response.status

        assert asyncio.run(ready()) == 503


def test_deadline_is_504_before_streaming_and_an_error_event_after(
    reference_triton: EmbeddedTriton, reference_checkpoint: Path
) -> None:
    settings = gateway_settings([model_entry(reference_checkpoint, reference_triton.grpc_url)], request_timeout_s=0.4)
    with GatewayThread(settings) as running:
        body = {"model": MODEL, "prompt": VARIED_PROMPTS[1], "model_parameters": {"max_tokens": 500}}
        code, _, payload = post(running.url, body)
        assert code == 504 and payload["error"]["type"] == "timeout"

        async def stream() -> tuple[list[bytes], int]:
            url = f"{running.url}/v4/completions"
            async with aiohttp.ClientSession() as session, session.post(url, json={**body, "stream": True}) as response:
                return [line async for line in response.content if line.strip()], response.status

        lines, status = asyncio.run(stream())
        assert status == 200
        assert lines[-2] == b"event: error\n"
        assert json.loads(lines[-1][len(b"data: ") :])["error"]["status"] == 504
    wait_for_metric(reference_triton.metrics_url, "cpu_llm_active_sequences", 0, timeout_s=2.0)


def test_streamed_events_have_exactly_the_schemas_shape() -> None:
    from gateway.completions import Finished, TextDelta
    from gateway.schema import Completion, CompletionResponse, TokenUsage
    from gateway.views import _event_json

    for text in ("plain", 'quotes " and \\ backslash\n', "é 東京 😀"):
        expected = CompletionResponse(completion=Completion(text=text)).model_dump(mode="json")
        assert json.loads(_event_json(TextDelta(text, 1))) == expected
    usage = TokenUsage(prompt=3, completion=2, total=5)
    last = json.loads(_event_json(Finished("length", usage)))
    assert last == {
        "completion": {"text": "", "finish_reason": "length", "response_metadata": None},
        "token_usage": {"prompt": 3, "completion": 2, "total": 5},
    }


def test_a_model_missing_in_triton_is_503_and_not_ready(
    reference_triton: EmbeddedTriton, reference_checkpoint: Path
) -> None:
    entry = model_entry(reference_checkpoint, reference_triton.grpc_url).model_copy(update={"ensemble": "not_loaded"})
    with GatewayThread(gateway_settings([entry])) as running:
        code, _, payload = post(running.url, {"model": MODEL, "prompt": "hi"})
        assert code == 503
        assert "model 'not_loaded' is not ready" in payload["error"]["message"]

        async def ready() -> tuple[int, Any]:
            async with aiohttp.ClientSession() as session, session.get(f"{running.url}/readyz") as response:
                return response.status, await response.json()

        status, body = asyncio.run(ready())
        assert (status, body["status"], body["models"]) == (503, "not ready", {MODEL: False})
        assert body["replicas"][MODEL][reference_triton.grpc_url]["error"] == "model 'not_loaded' is not ready"


def test_clients_reusing_a_request_id_do_not_stop_each_other(gateway: RunningGateway) -> None:
    body = {"model": MODEL, "prompt": VARIED_PROMPTS[1], "model_parameters": {"temperature": 0, "max_tokens": 24}}

    async def run() -> tuple[int, str]:
        async with aiohttp.ClientSession() as session:

            async def leaver() -> None:
                headers = {"x-request-id": "shared-id"}
                async with session.post(
                    f"{gateway.url}/v4/completions", json={**body, "stream": True}, headers=headers
                ) as r:
                    async for _ in r.content:
                        return  # leaves after the first line: its generation is stopped

            async def stayer() -> tuple[int, str]:
                await asyncio.sleep(0.05)
                headers = {"x-request-id": "shared-id"}
                async with session.post(f"{gateway.url}/v4/completions", json=body, headers=headers) as r:
                    return r.status, (await r.json())["completion"]["text"]

            _, result = await asyncio.gather(leaver(), stayer())
            return result

    status, text = asyncio.run(run())
    code, _, alone = post(gateway.url, body)
    assert status == 200 == code
    assert text == alone["completion"]["text"]
