"""One completion from a validated request to text events: decoding, stop sequences, cancellation, usage.

The HTTP layer (views.py) turns these events into a JSON body or SSE events; nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from tritonclient.grpc.service_pb2 import ModelInferRequest

from gateway.errors import (
    AdapterNotCached,
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    ModelUnhealthy,
    ReplicaFailure,
)
from gateway.images import Image, ImagePolicy, load_images
from gateway.registry import ResolvedModel, ServedModel
from gateway.schema import CompletionRequest, FinishReason, TokenUsage
from gateway.stop_sequences import StopSequenceMatcher
from gateway.triton_channel import TritonEndpoint
from gateway.triton_translation import Chunk, GenerationPlan, ensemble_request

log = logging.getLogger(__name__)

# Stop requests in flight (a reference keeps the tasks alive until they finish).
_stopping: set[asyncio.Task[None]] = set()


@dataclass(frozen=True)
class TextDelta:
    text: str
    completion_tokens: int  # generated so far, this text included


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    usage: TokenUsage


Event = TextDelta | Finished


async def plan_completion(
    resolved: ResolvedModel, request: CompletionRequest, image_policy: ImagePolicy
) -> GenerationPlan:
    """The generation plan, after fetching and checking the request's images; a model that does not accept
    images refuses them before any is fetched."""
    model = resolved.base
    if request.images and not model.entry.accepts_images:
        raise InvalidRequest(f"model '{model.entry.id}' does not accept images", param="images")
    images = await load_images([i.image_url for i in request.images], image_policy) if request.images else ()
    return await _plan(resolved, request, images)


async def _plan(resolved: ResolvedModel, request: CompletionRequest, images: Sequence[Image]) -> GenerationPlan:
    model = resolved.base
    parameters = request.model_parameters
    prompt_tokens = await model.count_prompt_tokens(request.prompt, len(images))
    if prompt_tokens == 0:  # e.g. only control characters the tokenizer drops: nothing to continue from
        raise InvalidRequest("the prompt has no tokens for this model's tokenizer", param="prompt")
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
        lora=resolved.lora,
        images=tuple(image.data for image in images),
    )


async def run_completion(
    model: ServedModel, plan: GenerationPlan, request_id: str, stop_timeout_s: float
) -> AsyncGenerator[Event, None]:
    """Stream one completion. Leaving early (client gone, deadline) ends the generation on the server too.

    Triton sees its own unique id, not the client's x-request-id: `stop` requests name the id, and two clients
    (or one client reusing an id) must never stop each other's generations.
    """
    triton_id = f"{request_id[:64]}-{uuid.uuid4().hex}"
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    matcher = StopSequenceMatcher(plan.stop_sequences)
    completion_tokens = 0
    endpoint = model.replicas.pick()
    stream: AsyncGenerator[Chunk, None] | None = None
    may_be_running = False  # whether `endpoint` may still be generating for us (then it must be stopped)
    tried: list[str] = []
    resent_adapter = False
    try:
        while True:
            # A replica found failed (unreachable, or its model crashed) before its first response is marked
            # down and the request goes to the next one: nothing was generated for the client yet.
            request = await _request_for(endpoint, model, triton_id, plan)
            stream, may_be_running = endpoint.stream(request), True
            try:
                chunk = await anext(stream)
                break
            except AdapterNotCached as error:
                # The server evicted the adapter (or restarted): send it again with its weights, once.
                await stream.aclose()
                stream, may_be_running = None, False
                assert plan.lora is not None
                endpoint.lora_tasks.discard(plan.lora.task_id)
                if resent_adapter:
                    raise InferenceFailed(f"inference failed: {error.message}") from error
                resent_adapter = True
            except ReplicaFailure as error:
                await stream.aclose()
                stream, may_be_running = None, False
                model.replicas.mark_down(error.address, str(error), needs_probe=isinstance(error, ModelUnhealthy))
                tried.append(error.address)
                endpoint = model.replicas.pick(exclude=tried)
        log.debug("request %s runs on %s as %s", request_id, endpoint.address, triton_id)
        if plan.lora is not None:
            endpoint.lora_tasks.add(plan.lora.task_id)
        while True:
            completion_tokens += chunk.tokens
            text = matcher.feed(decoder.decode(chunk.data, final=chunk.final))
            if chunk.final:
                text += matcher.flush()
                may_be_running = False
            if text:
                yield TextDelta(text, completion_tokens)
            if matcher.matched or chunk.final:
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
            chunk = await anext(stream)
    except ReplicaFailure as error:
        model.replicas.mark_down(error.address, str(error), needs_probe=isinstance(error, ModelUnhealthy))
        may_be_running = False  # the server (or the model process) that ran it is gone
        raise
    finally:
        if stream is not None:
            await stream.aclose()
        if may_be_running:
            # Cancelling the stream does not reach a decoupled model inside an ensemble: stop it by request id,
            # on the replica that runs it. In the background, so a client that left does not wait for it.
            task = asyncio.ensure_future(endpoint.stop(model.entry.generation_model, triton_id, stop_timeout_s))
            _stopping.add(task)
            task.add_done_callback(_stopping.discard)


async def _request_for(
    endpoint: TritonEndpoint, model: ServedModel, triton_id: str, plan: GenerationPlan
) -> ModelInferRequest:
    """The ensemble request for this replica: an adapter's weights go along unless it has them cached."""
    tensors = None
    if plan.lora is not None and plan.lora.task_id not in endpoint.lora_tasks:
        try:
            tensors = await asyncio.to_thread(plan.lora.load_tensors)
        except FileNotFoundError:
            # Removed (admin API) while this request waited for its slot: as if it had arrived afterwards.
            raise ModelNotFound(f"model '{plan.lora.model_id}' is not served here", param="model") from None
    return ensemble_request(model.entry.ensemble, triton_id, plan, tensors)


async def finish_pending_stops() -> None:
    """Let stop requests in flight reach Triton (called before the gRPC channels close)."""
    if _stopping:
        await asyncio.gather(*_stopping, return_exceptions=True)
