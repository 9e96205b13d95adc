"""HTTP handlers: the completion endpoint (JSON or SSE), the model list, and health checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

from aiohttp import web
from pydantic import ValidationError

from gateway.completions import Event, Finished, TextDelta, plan_completion, run_completion
from gateway.errors import DeadlineExceeded, GatewayError, InvalidRequest
from gateway.middlewares import REQUEST_ID, REQUEST_ID_HEADER
from gateway.schema import Completion, CompletionRequest, CompletionResponse, ModelList
from gateway.state import REGISTRY, SETTINGS


def _validation_error(error: ValidationError) -> InvalidRequest:
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"]) or "body"
    message = first["msg"].removeprefix("Value error, ")
    return InvalidRequest(f"{location}: {message}", param=location)


async def _read_request(request: web.Request) -> CompletionRequest:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidRequest(f"the body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    try:
        return CompletionRequest.model_validate(body)
    except ValidationError as error:
        raise _validation_error(error) from error


def _sse(payload: str, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


async def create_completion(request: web.Request) -> web.StreamResponse:
    body = await _read_request(request)
    model = request.app[REGISTRY].get(body.model)
    plan = plan_completion(model, body)
    settings = request.app[SETTINGS]
    request_id = request[REQUEST_ID]
    deadline = asyncio.get_running_loop().time() + settings.request_timeout_s
    async with contextlib.aclosing(run_completion(model, plan, request_id, settings.stop_request_timeout_s)) as events:
        if body.stream:
            return await _stream(request, events, request_id, deadline)
        text: list[str] = []
        try:
            async with asyncio.timeout_at(deadline):
                async for event in events:
                    if isinstance(event, TextDelta):
                        text.append(event.text)
                        continue
                    completion = Completion(text="".join(text), finish_reason=event.finish_reason)
                    body_out = CompletionResponse(completion=completion, token_usage=event.usage)
                    return web.json_response(body_out.model_dump(mode="json"))
        except TimeoutError as error:
            raise _deadline(settings.request_timeout_s) from error
    raise GatewayError("the generation ended without a final response")


def _deadline(seconds: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"the request exceeded its deadline of {seconds:g} s")


async def _next_before(events: AsyncIterator[Event], deadline: float) -> Event:
    async with asyncio.timeout_at(deadline):
        try:
            return await anext(events)
        except StopAsyncIteration:
            raise GatewayError("the generation ended without a final response") from None


async def _stream(
    request: web.Request, events: AsyncIterator[Event], request_id: str, deadline: float
) -> web.StreamResponse:
    timeout_s = request.app[SETTINGS].request_timeout_s
    # Wait for the first event before sending headers: an error before any text is still a plain HTTP error.
    try:
        event = await _next_before(events, deadline)
    except TimeoutError as error:
        raise _deadline(timeout_s) from error
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", REQUEST_ID_HEADER: request_id}
    )
    await response.prepare(request)
    try:
        while True:
            await response.write(_sse(_event_json(event)))
            if isinstance(event, Finished):
                break
            event = await _next_before(events, deadline)
    except GatewayError as error:
        await response.write(_sse(json.dumps(error.body(request_id)), event="error"))
    except TimeoutError:
        await response.write(_sse(json.dumps(_deadline(timeout_s).body(request_id)), event="error"))
    await response.write_eof()
    return response


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
    return web.json_response(ModelList(data=[m.card() for m in registry.models.values()]).model_dump(mode="json"))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    timeout = request.app[SETTINGS].readiness_timeout_s
    checks = await asyncio.gather(
        *(m.endpoint.model_ready(m.entry.ensemble, timeout) for m in registry.models.values())
    )
    models = {model_id: ready for model_id, ready in zip(registry.models, checks, strict=True)}
    status = 200 if all(checks) else 503
    return web.json_response({"status": "ready" if status == 200 else "not ready", "models": models}, status=status)
