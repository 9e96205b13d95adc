"""One long-lived gRPC channel per Triton endpoint: streaming calls, readiness, and stop requests."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.errors import (
    AdapterNotCached,
    GatewayError,
    InferenceFailed,
    ModelUnhealthy,
    ReplicaUnreachable,
    UpstreamUnavailable,
)
from gateway.triton_translation import Chunk, GenerationPlan, ensemble_request, read_chunk, stop_request

log = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 30_000),
    # A replica that comes back must be reachable within seconds, not after gRPC's default backoff (up to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

# How long a server that just answered with an error gets to show it is still alive.
DYING_CHECK_S = 1.0

PROBE_PLAN = GenerationPlan(
    prompt="ok", prompt_tokens=1, max_tokens=1, temperature=0.0, top_k=1, top_p=None,
    presence_penalty=0.0, frequency_penalty=0.0, stop_sequences=(),
)  # fmt: skip


class TritonEndpoint:
    def __init__(self, address: str) -> None:
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.last_message_at = time.monotonic()  # when any stream last received a message
        self._open_calls: dict[Any, float] = {}  # open streams, with when each was opened
        self._abandoned: dict[Any, str] = {}  # calls cut by abandon_stalled_calls, with the reason
        # LoRA task ids this server was sent and answered: later requests send the task id alone. A server
        # that evicted one answers "not found in cache" and gets the weights again.
        self.lora_tasks: set[int] = set()

    async def close(self) -> None:
        await self.channel.close()

    async def model_ready(self, model: str, timeout_s: float) -> tuple[bool, str | None]:
        """(ready, why not)."""
        try:
            reply = await self.stub.ModelReady(service_pb2.ModelReadyRequest(name=model), timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            return False, f"unreachable ({error.code().name})"
        return (True, None) if reply.ready else (False, f"model '{model}' is not ready")

    async def stream(self, request: service_pb2.ModelInferRequest) -> AsyncGenerator[Chunk, None]:
        """Send one request on its own ModelStreamInfer call and yield its responses until the final one.

        Leaving the iteration early (stop sequence, client gone, deadline) cancels the call. After the final
        response the call is left to end by itself (the request side is already closed, so Triton closes it):
        cancelling calls that had completed made tritonserver's own memory grow by ~16 MiB a minute under
        load (measured with the soak's mix), so only unfinished calls are cancelled.
        """

        async def requests() -> AsyncIterator[service_pb2.ModelInferRequest]:
            yield request

        call = self.stub.ModelStreamInfer(requests())
        self._open_calls[call] = time.monotonic()
        completed = False
        try:
            try:
                async for message in call:
                    self.last_message_at = time.monotonic()
                    if message.error_message:
                        raise _classify(message.error_message, self.address)
                    chunk = read_chunk(message.infer_response)
                    if chunk.final:
                        completed = True
                    yield chunk
                    if chunk.final:
                        return
                raise InferenceFailed("the inference server closed the stream before the final response")
            except asyncio.CancelledError:
                # grpc.aio reports a call cancelled here as a cancellation of the reader: ours (abandoned), unless
                # the task itself is being cancelled (client gone, deadline).
                task = asyncio.current_task()
                if call in self._abandoned and not (task is not None and task.cancelling()):
                    raise ReplicaUnreachable(self._abandoned[call], self.address) from None
                raise
            except grpc.aio.AioRpcError as error:
                if call in self._abandoned:
                    raise ReplicaUnreachable(self._abandoned[call], self.address) from error
                task = asyncio.current_task()
                if error.code() == grpc.StatusCode.CANCELLED and task is not None and task.cancelling():
                    # We cancelled it (client gone, deadline): not the replica's fault, the cancellation goes on.
                    raise asyncio.CancelledError from error
                raise _rpc_error(error, self.address) from error
        except AdapterNotCached:
            raise
        except InferenceFailed as error:
            # A server that is dying (killed with its model processes) can answer with odd errors for a few
            # milliseconds before its port closes; if it no longer answers, that is what the error was.
            ready, _ = await self.model_ready(request.model_name, DYING_CHECK_S)
            if not ready:
                raise ReplicaUnreachable("the inference server became unreachable", self.address) from error
            raise
        finally:
            self._open_calls.pop(call, None)
            self._abandoned.pop(call, None)
            if completed:
                closing = asyncio.ensure_future(_let_finish(call))
                _closing.add(closing)
                closing.add_done_callback(_closing.discard)
            else:
                call.cancel()

    @property
    def in_flight(self) -> int:
        """Streams open on this server, all models together: what balancing compares."""
        return len(self._open_calls)

    def stalled(self, quiet_s: float) -> bool:
        """Streams are open and none has received anything for quiet_s: a server that stopped answering (frozen,
        or shutting down with requests it will not finish), not one that is busy generating."""
        now = time.monotonic()
        return any(
            call not in self._abandoned and now - max(opened, self.last_message_at) > quiet_s
            for call, opened in self._open_calls.items()
        )

    def abandon_stalled_calls(self, reason: str) -> None:
        """Cut the open streams: each fails as an unreachable replica (retried elsewhere before its first text,
        an error event after), instead of waiting for gRPC's keepalive to notice, a minute or more."""
        for call in list(self._open_calls):
            self._abandoned[call] = reason
            call.cancel()

    async def probe(self, ensemble: str, timeout_s: float) -> tuple[bool, str | None]:
        """A real one-token request through the ensemble (every model process in it): (healthy, why not)."""
        request = ensemble_request(ensemble, f"health-probe-{uuid.uuid4().hex}", PROBE_PLAN)
        try:
            async with asyncio.timeout(timeout_s):
                async for _ in self.stream(request):
                    pass
        except GatewayError as error:
            return False, error.message
        except TimeoutError:
            return False, f"no answer to a one-token request within {timeout_s:g} s"
        return True, None

    async def stop(self, generation_model: str, request_id: str, timeout_s: float) -> None:
        """Ask the generation model to end request_id now; best effort (the call is already cancelled)."""
        try:
            async with asyncio.timeout(timeout_s):
                async for _ in self.stream(stop_request(generation_model, request_id)):
                    pass
        except (GatewayError, TimeoutError) as error:
            log.warning("stop request for %s was not acknowledged: %s", request_id, error)


# Completed calls waiting for Triton to close them (a reference keeps each alive until then: a call that is
# garbage-collected while open is cancelled).
_closing: set[asyncio.Future[None]] = set()
CLOSE_WAIT_S = 5.0


async def _let_finish(call: Any) -> None:
    try:
        async with asyncio.timeout(CLOSE_WAIT_S):
            await call.code()
    except (TimeoutError, asyncio.CancelledError):
        call.cancel()


def _classify(message: str, address: str) -> GatewayError:
    lowered = message.lower()
    # TensorRT-LLM's LoRA cache messages (the CPU generation model uses the same).
    if "not found in cache" in lowered and "lora" in lowered:
        return AdapterNotCached(message)
    if "cache is full" in lowered:
        return UpstreamUnavailable("the inference server's LoRA cache is full of adapters in use; retry shortly")
    if "not healthy" in lowered:
        log.error("Triton at %s: %s", address, message)
        return ModelUnhealthy(f"the model's server process crashed on an inference server (Triton: {message})", address)
    if "is not ready" in lowered or "unavailable" in lowered or "unknown model" in lowered:
        return UpstreamUnavailable(f"the model is not available: {message}")
    log.warning("Triton at %s answered with an error: %s", address, message)
    return InferenceFailed(f"inference failed: {message}")


def _rpc_error(error: grpc.aio.AioRpcError, address: str) -> GatewayError:
    if error.code() == grpc.StatusCode.CANCELLED:  # by the server (shutting down): retryable, not a dead replica
        return UpstreamUnavailable("the inference server cancelled the request")
    if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        log.warning("Triton at %s: %s %s", address, error.code().name, error.details())
        return ReplicaUnreachable("the inference server became unreachable", address)
    return _classify(error.details() or str(error.code()), address)
