"""The CPU generation model's scheduler thread on a real engine: what one request's failure must not do to the
others, and what shutdown owes the requests it never started. (The Triton glue is covered end to end by the
ensemble tests; here the callbacks are plain functions, so failures can be made to happen on purpose.)"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from build_engines.tiny_checkpoints import TokenizerStyle
from cpu_engine import Engine, EngineLimits, GenerationRequest, SamplingParams
from triton_models.lora_cache import LoraCache
from triton_models.scheduler import ScheduledRequest, Scheduler

WAIT_S = 30.0


@dataclass
class Client:
    """What one client received; `fail_on` makes its n-th send (1-based) raise, as Triton's sender can."""

    name: str
    fail_on: int | None = None
    tokens: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sends: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def send(self, tokens: list[int], log_probs: list[float], cum_log_prob: float, final: bool) -> None:
        self.sends += 1
        if self.sends == self.fail_on:
            raise RuntimeError("Triton could not send the response")
        self.tokens += tokens
        if final:
            self.done.set()

    def send_error(self, message: str) -> None:
        self.errors.append(message)
        self.done.set()


def _request(client: Client, engine_id: str, new_tokens: int) -> ScheduledRequest:
    generation = GenerationRequest(engine_id, (5, 6, 7), new_tokens, SamplingParams(temperature=0.0))
    return ScheduledRequest(generation, client.name, True, [], client.send, client.send_error, lambda: False)


def _scheduler(tiny_checkpoints: dict[TokenizerStyle, Path]) -> Scheduler:
    engine = Engine.from_checkpoint(tiny_checkpoints[TokenizerStyle.BYTE_BPE], EngineLimits(max_kv_tokens=512))
    return Scheduler(engine, LoraCache(engine.config, 0, 0))


def test_a_response_that_cannot_be_sent_ends_only_its_own_request(
    tiny_checkpoints: dict[TokenizerStyle, Path],
) -> None:
    scheduler = _scheduler(tiny_checkpoints)
    scheduler.start()
    try:
        final_fails = Client("final-fails", fail_on=3)  # its third and last send
        first_fails = Client("first-fails", fail_on=1)  # mid-stream: it is stopped
        healthy = Client("healthy")
        scheduler.submit(_request(final_fails, "1", 3))
        scheduler.submit(_request(first_fails, "2", 30))
        scheduler.submit(_request(healthy, "3", 40))
        for client in (final_fails, first_fails, healthy):
            assert client.done.wait(WAIT_S), client.name
        assert len(healthy.tokens) == 40 and not healthy.errors
        assert first_fails.errors == ["the response could not be sent: Triton could not send the response"]
        assert final_fails.errors and len(final_fails.tokens) == 2
        deadline = time.monotonic() + WAIT_S
        while scheduler.engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = scheduler.engine.stats()
        assert stats.active_sequences == 0 and stats.kv_tokens_in_use == 0  # the stopped one freed its cache
    finally:
        scheduler.shutdown()


def test_shutdown_answers_requests_it_never_started(tiny_checkpoints: dict[TokenizerStyle, Path]) -> None:
    scheduler = _scheduler(tiny_checkpoints)
    waiting = Client("waiting")
    stopper: list[threading.Thread] = []

    class Running(Client):
        def send(self, tokens: list[int], log_probs: list[float], cum_log_prob: float, final: bool) -> None:
            if not stopper:  # mid-step: a request arrives, then the model is unloaded
                scheduler.submit(_request(waiting, "2", 8))
                stopper.append(threading.Thread(target=scheduler.shutdown))
                stopper[0].start()
                deadline = time.monotonic() + WAIT_S
                while not scheduler._stopping.is_set() and time.monotonic() < deadline:
                    time.sleep(0.001)
            super().send(tokens, log_probs, cum_log_prob, final)

    running = Running("running")
    scheduler.start()
    scheduler.submit(_request(running, "1", 30))
    assert running.done.wait(WAIT_S) and waiting.done.wait(WAIT_S)
    stopper[0].join(WAIT_S)
    assert running.errors == ["the model is shutting down"]
    assert waiting.errors == ["the model is shutting down"] and not waiting.tokens
