"""One completion from a validated request to text events: decoding, stop sequences, cancellation, usage.

The HTTP layer (views.py) turns these events into a JSON body or SSE events; nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from gateway.errors import InvalidRequest
from gateway.registry import ServedModel
from gateway.schema import CompletionRequest, FinishReason, TokenUsage
from gateway.stop_sequences import StopSequenceMatcher
from gateway.triton_translation import GenerationPlan, ensemble_request

log = logging.getLogger(__name__)

# Stop requests in flight (a reference keeps the tasks alive until they finish).
_stopping: set[asyncio.Task[None]] = set()


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    usage: TokenUsage


Event = TextDelta | Finished


def plan_completion(model: ServedModel, request: CompletionRequest) -> GenerationPlan:
    if request.images and not model.entry.accepts_images:
        raise InvalidRequest(f"model '{model.entry.id}' does not accept images", param="images")
    parameters = request.model_parameters
    prompt_tokens = model.count_prompt_tokens(request.prompt)
    return GenerationPlan(
        prompt=request.prompt,
        prompt_tokens=prompt_tokens,
        max_tokens=model.resolve_max_tokens(parameters.max_tokens, prompt_tokens),
        temperature=parameters.temperature,
        top_k=parameters.top_k if parameters.top_k else None,
        top_p=parameters.top_p,
        presence_penalty=parameters.presence_penalty,
        frequency_penalty=parameters.frequency_penalty,
        stop_sequences=tuple(parameters.stop_sequences or ()),
    )


async def run_completion(
    model: ServedModel, plan: GenerationPlan, request_id: str, stop_timeout_s: float
) -> AsyncGenerator[Event, None]:
    """Stream one completion. Leaving early (client gone, deadline) ends the generation on the server too.

    Triton sees its own unique id, not the client's x-request-id: `stop` requests name the id, and two clients
    (or one client reusing an id) must never stop each other's generations.
    """
    triton_id = f"{request_id[:64]}-{uuid.uuid4().hex}"
    log.debug("request %s runs in Triton as %s", request_id, triton_id)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    matcher = StopSequenceMatcher(plan.stop_sequences)
    completion_tokens = 0
    finished = False
    stream = model.endpoint.stream(ensemble_request(model.entry.ensemble, triton_id, plan))
    try:
        async for chunk in stream:
            completion_tokens += chunk.tokens
            text = matcher.feed(decoder.decode(chunk.data, final=chunk.final))
            if chunk.final:
                text += matcher.flush()
            if text:
                yield TextDelta(text)
            if matcher.matched or chunk.final:
                finished = chunk.final
                reason: FinishReason = "stop"
                if not matcher.matched and completion_tokens >= plan.max_tokens:
                    reason = "length"
                usage = TokenUsage(
                    prompt=plan.prompt_tokens,
                    completion=completion_tokens,
                    total=plan.prompt_tokens + completion_tokens,
                )
                yield Finished(reason, usage)
                return
    finally:
        await stream.aclose()
        if not finished:
            # Cancelling the stream does not reach a decoupled model inside an ensemble: stop it by request id.
            # In the background, so a client that left does not wait for it.
            task = asyncio.ensure_future(model.endpoint.stop(model.entry.generation_model, triton_id, stop_timeout_s))
            _stopping.add(task)
            task.add_done_callback(_stopping.discard)


async def finish_pending_stops() -> None:
    """Let stop requests in flight reach Triton (called before the gRPC channels close)."""
    if _stopping:
        await asyncio.gather(*_stopping, return_exceptions=True)
