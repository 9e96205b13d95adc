"""HTTP handlers: the completion endpoint (JSON or SSE), the model list, and health checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import hdrs, web
from aiohttp.compression_utils import HAS_BROTLI
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from gateway.accounting import CLIENT_CLOSED, RequestTrace
from gateway.auth import Caller, is_text, resolve_account
from gateway.completions import Event, Finished, TextDelta, plan_completion, run_completion
from gateway.errors import DeadlineExceeded, GatewayError, InvalidRequest, PayloadTooLarge
from gateway.headers import (
    COMPLETION_TOKENS_HEADER,
    MIN_REQUEST_TIMEOUT_S,
    PROMPT_TOKENS_HEADER,
    REQUEST_TIMEOUT_HEADER,
    TTFT_HEADER,
)
from gateway.lifecycle import shutting_down
from gateway.middlewares import REQUEST_ID, REQUEST_ID_HEADER
from gateway.openapi import openapi_document
from gateway.schema import Completion, CompletionRequest, CompletionResponse, ModelList
from gateway.state import (
    ACCOUNTING,
    AUTHENTICATOR,
    IMAGE_POLICY,
    LIFECYCLE,
    METRICS,
    READINESS_CHECK,
    REGISTRY,
    SETTINGS,
)

log = logging.getLogger(__name__)


def _validation_error(error: ValidationError) -> InvalidRequest:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "body"
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"{location}: {message}", param=location)


# What aiohttp decompresses (brotli only where a brotli module is installed).
_BODY_ENCODINGS = frozenset({"identity", "gzip", "deflate"} | ({"br"} if HAS_BROTLI else set()))


async def _read_request(request: web.Request) -> CompletionRequest:
    limit = request.app[SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        # Refused on the declared size, before reading any of it.
        raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
    # Every content-encoding line, as aiohttp's parser (which decodes by the last one) sees them: one, or none.
    encodings = [value.strip().lower() for value in request.headers.getall(hdrs.CONTENT_ENCODING, [])]
    if len(encodings) > 1 or any("," in value for value in encodings):
        raise InvalidRequest("the body may have one content-encoding, not several", param="content-encoding")
    encoding = encodings[0] if encodings and encodings[0] else "identity"
    if encoding not in _BODY_ENCODINGS:
        # aiohttp would pass an encoding it does not know through as it is: refused by name instead.
        raise InvalidRequest(
            f"content-encoding '{encoding}' is not supported ({', '.join(sorted(_BODY_ENCODINGS))})",
            param="content-encoding",
        )
    try:
        raw = await request.read()
    except RequestPayloadError:
        if encoding == "identity":  # cut short, or its chunked framing broke
            raise InvalidRequest("the request body could not be read (incomplete or malformed)") from None
        raise InvalidRequest(f"the {encoding} body could not be decoded", param="content-encoding") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRequest(f"the body is not valid UTF-8 (byte {error.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidRequest(f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidRequest("the body is not acceptable JSON: nested too deeply") from None
    except ValueError as error:  # e.g. an integer with thousands of digits
        raise InvalidRequest(f"the body is not acceptable JSON: {error}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        where = _unencodable_text(body, "")
    except RecursionError:  # the walk recurses like the parser: a deeper call stack here could hit the limit first
        raise InvalidRequest("the body is not acceptable JSON: nested too deeply") from None
    if where is not None:
        raise InvalidRequest(f"{where}: a string holds an unpaired UTF-16 surrogate escape", param=where)
    try:
        return CompletionRequest.model_validate(body)
    except ValidationError as error:
        raise _validation_error(error) from error


def _unencodable_text(value: object, path: str) -> str | None:
    """The path of the first string (key or value) that is not valid Unicode text, e.g. "\\ud800" in the JSON:
    JSON allows such escapes, but no tokenizer, database or UTF-8 encoder takes them."""
    if isinstance(value, str):
        return None if is_text(value) else path
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if _unencodable_text(key, where) is not None:
                return where
            found = _unencodable_text(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unencodable_text(item, f"{path}.{index}")
            if found is not None:
                return found
    return None


def _sse(payload: str, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


@dataclass(frozen=True)
class Deadline:
    seconds: float  # what the request was given (for its 504 message)
    at: float  # the event loop's time it ends


async def create_completion(request: web.Request) -> web.StreamResponse:
    caller = request.app[AUTHENTICATOR].authenticate(request)  # 401 before the body is read
    # One deadline for the whole request, from its arrival: reading a body that trickles in counts against it.
    settings = request.app[SETTINGS]
    timeout_s = _request_timeout(request, settings.request_timeout_s)
    now = asyncio.get_running_loop().time()
    deadline = Deadline(timeout_s, now + timeout_s)
    # The body gets less time than the generation: an upload that stalls (or whose chunked framing broke, which
    # aiohttp leaves waiting for more) holds a connection for body_read_timeout_s, not for the whole deadline.
    body_timeout_s = min(timeout_s, settings.body_read_timeout_s)
    try:
        async with asyncio.timeout_at(now + body_timeout_s):
            body = await _read_request(request)
    except TimeoutError as error:
        raise DeadlineExceeded(f"the request body did not arrive within {body_timeout_s:g} s") from error
    # In flight from here: a drain waits for completions, not for uploads that have not arrived.
    with request.app[LIFECYCLE].request():
        return await _create_completion(request, caller, body, deadline)


async def _create_completion(
    request: web.Request, caller: Caller, body: CompletionRequest, deadline: Deadline
) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    account = resolve_account(request, body.account_id, settings.require_account, caller)
    request_id = request[REQUEST_ID]
    trace = RequestTrace(request_id, body.model, account, caller.key_id, body.stream)
    try:
        return await _complete(request, body, trace, deadline.seconds, deadline.at)
    except GatewayError as error:
        trace.status, trace.error = error.status, error.type
        raise
    except (asyncio.CancelledError, ConnectionResetError) as error:
        if isinstance(error, asyncio.CancelledError) and app[LIFECYCLE].ended_by_shutdown():
            failure = shutting_down()  # ended before its answer started: a plain 503
            trace.status, trace.error = failure.status, failure.type
            raise failure from None
        if trace.error is None:
            trace.status, trace.error = CLIENT_CLOSED, "client_closed"
        raise
    except Exception:
        trace.status, trace.error = 500, "internal_error"
        raise
    finally:
        app[ACCOUNTING].finish(trace)


async def _complete(
    request: web.Request, body: CompletionRequest, trace: RequestTrace, timeout_s: float, deadline: float
) -> web.StreamResponse:
    resolved = request.app[REGISTRY].resolve(body.model)
    model = resolved.base  # a custom model runs on its base model's replicas and admission
    trace.metric_model = resolved.id
    settings = request.app[SETTINGS]
    metrics = request.app[METRICS]
    try:
        async with asyncio.timeout_at(deadline):  # fetching the request's images counts against its deadline
            plan = await plan_completion(resolved, body, request.app[IMAGE_POLICY])
    except TimeoutError as error:
        raise _deadline(timeout_s) from error
    queued = metrics.queued.labels(resolved.id)
    queued.inc()
    waiting = True
    try:
        async with model.admission.slot(trace.account_id, deadline):
            queued.dec()
            waiting = False
            # The prompt is the model's from here (a request refused or timed out in the queue processed none of
            # it); usage counts it once the model answers (RequestTrace.billed_prompt_tokens).
            trace.prompt_tokens = plan.prompt_tokens
            trace.queue_wait_s = time.perf_counter() - trace.arrived
            metrics.queue_wait.labels(resolved.id).observe(trace.queue_wait_s)
            with metrics.in_flight.labels(resolved.id).track_inprogress():
                events = run_completion(model, plan, trace.request_id, settings.stop_request_timeout_s)
                async with contextlib.aclosing(events):
                    if body.stream:
                        return await _stream(request, events, trace, deadline, timeout_s)
                    return await _respond(events, trace, deadline, timeout_s)
    finally:
        if waiting:
            queued.dec()


async def _respond(
    events: AsyncIterator[Event], trace: RequestTrace, deadline: float, timeout_s: float
) -> web.Response:
    text: list[str] = []
    try:
        async with asyncio.timeout_at(deadline):
            async for event in events:
                if isinstance(event, TextDelta):
                    trace.text_arrived()
                    trace.completion_tokens = event.completion_tokens
                    text.append(event.text)
                    continue
                _finished(trace, event)
                completion = Completion(text="".join(text), finish_reason=event.finish_reason)
                body_out = CompletionResponse(completion=completion, token_usage=event.usage)
                ttft = trace.time_to_first_token_s
                headers = {
                    PROMPT_TOKENS_HEADER: str(event.usage.prompt),
                    COMPLETION_TOKENS_HEADER: str(event.usage.completion),
                }
                if ttft is not None:
                    headers[TTFT_HEADER] = f"{ttft * 1000:.1f}"
                return web.json_response(body_out.model_dump(mode="json"), headers=headers)
    except TimeoutError as error:
        raise _deadline(timeout_s) from error
    raise GatewayError("the generation ended without a final response")


def _finished(trace: RequestTrace, event: Finished) -> None:
    trace.finish_reason = event.finish_reason
    trace.prompt_tokens = event.usage.prompt
    trace.completion_tokens = event.usage.completion


def _deadline(seconds: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"the request exceeded its deadline of {seconds:g} s")


async def _next_event(events: AsyncIterator[Event]) -> Event:
    try:
        return await anext(events)
    except StopAsyncIteration:
        raise GatewayError("the generation ended without a final response") from None


async def _next_before(events: AsyncIterator[Event], deadline: float) -> Event:
    async with asyncio.timeout_at(deadline):
        return await _next_event(events)


def _request_timeout(request: web.Request, cap_s: float) -> float:
    """The client's x-request-timeout (seconds), capped by the server's request_timeout_s."""
    raw = request.headers.get(REQUEST_TIMEOUT_HEADER)
    if raw is None:
        return cap_s
    try:
        asked = float(raw)
    except ValueError:
        asked = float("nan")
    if not MIN_REQUEST_TIMEOUT_S <= asked < float("inf"):
        raise InvalidRequest(
            f"{REQUEST_TIMEOUT_HEADER} must be a number of seconds, at least {MIN_REQUEST_TIMEOUT_S:g}",
            param=REQUEST_TIMEOUT_HEADER,
        )
    return min(asked, cap_s)


async def _stream(
    request: web.Request, events: AsyncIterator[Event], trace: RequestTrace, deadline: float, timeout_s: float
) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    # Wait for the first event before sending headers: an error before any text is still a plain HTTP error.
    try:
        event = await _next_before(events, deadline)
    except TimeoutError as error:
        raise _deadline(timeout_s) from error
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", REQUEST_ID_HEADER: trace.request_id}
    )
    _bound_send_buffer(request, settings.stream_send_buffer_bytes)
    await response.prepare(request)
    failure: GatewayError | None = None
    transport = request.transport
    try:
        async with asyncio.timeout_at(deadline):  # one deadline for the whole stream, not a timer per token
            while True:
                if isinstance(event, TextDelta):
                    trace.text_arrived()
                    trace.completion_tokens = event.completion_tokens
                else:
                    _finished(trace, event)
                data = _sse(_event_json(event))
                if transport is not None and transport.get_write_buffer_size() > 0:
                    # The socket is full: this write may wait on the client, and not forever.
                    try:
                        async with asyncio.timeout(settings.slow_client_timeout_s):
                            await response.write(data)
                    except TimeoutError:
                        _cut_slow_client(request, trace, settings.slow_client_timeout_s)
                        raise ConnectionResetError("slow client cut off") from None
                else:
                    await response.write(data)
                if isinstance(event, Finished):
                    break
                event = await _next_event(events)
    except GatewayError as error:
        failure = error
    except TimeoutError:
        failure = _deadline(timeout_s)
    except asyncio.CancelledError:
        if not request.app[LIFECYCLE].ended_by_shutdown():
            raise
        failure = shutting_down()
    if failure is not None:
        # The status line went out as 200; the error travels as an event, and the trace records it.
        trace.status, trace.error = failure.status, failure.type
        await response.write(_sse(json.dumps(failure.body(trace.request_id)), event="error"))
    await response.write_eof()
    return response


def _bound_send_buffer(request: web.Request, size: int) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _cut_slow_client(request: web.Request, trace: RequestTrace, timeout_s: float) -> None:
    """The client stopped reading and every buffer is full: drop the connection (leaving the generator, the
    caller's `aclosing` stops the generation)."""
    log.warning("request %s: the client took nothing for %g s with its buffers full; stream cut",
                trace.request_id, timeout_s)  # fmt: skip
    trace.status, trace.error = CLIENT_CLOSED, "slow_client"
    if request.transport is not None:
        request.transport.abort()


_DELTA_HEAD = '{"completion":{"text":'
_DELTA_TAIL = ',"finish_reason":null,"response_metadata":null},"token_usage":null}'


def _event_json(event: TextDelta | Finished) -> str:
    if isinstance(event, TextDelta):
        # The hot path (one event per token): the schema's shape, without building a model per event.
        return _DELTA_HEAD + json.dumps(event.text) + _DELTA_TAIL
    else:
        payload = CompletionResponse(
            completion=Completion(text="", finish_reason=event.finish_reason), token_usage=event.usage
        )
    return payload.model_dump_json()


async def list_models(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    return web.json_response(ModelList(data=registry.cards()).model_dump(mode="json"))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when every model has at least one ready replica; checks them all now (not the last round's result),
    in one round shared by the calls that arrive meanwhile."""
    if request.app[LIFECYCLE].draining:
        return web.json_response({"status": "draining"}, status=503)
    registry = request.app[REGISTRY]
    timeout = request.app[SETTINGS].readiness_timeout_s
    pools = [m.replicas for m in registry.models.values()]
    await request.app[READINESS_CHECK].run(lambda: asyncio.gather(*(pool.check(timeout) for pool in pools)))
    models = {model_id: pool.ready for model_id, pool in zip(registry.models, pools, strict=True)}
    replicas = {model_id: pool.state() for model_id, pool in zip(registry.models, pools, strict=True)}
    status = 200 if all(models.values()) else 503
    body = {"status": "ready" if status == 200 else "not ready", "models": models, "replicas": replicas}
    return web.json_response(body, status=status)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; replica gauges are read from the replica pools at scrape time."""
    gauges = request.app[METRICS]
    # Only the replicas there are now: one that left DNS must not stay a series forever.
    gauges.replica_ready.clear()
    gauges.replica_in_flight.clear()
    for model_id, model in request.app[REGISTRY].models.items():
        for address, replica in model.replicas.replicas.items():
            gauges.replica_ready.labels(model_id, address).set(1 if replica.ready else 0)
            gauges.replica_in_flight.labels(address).set(replica.endpoint.in_flight)
    body = generate_latest(gauges.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())
