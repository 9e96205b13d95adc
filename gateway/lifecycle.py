"""Graceful shutdown: on SIGTERM the gateway stops taking completions (503), lets the ones in flight finish
up to `drain_timeout_s`, ends those still running with a 503 of their own (an SSE error event when the
stream has started), then closes (the usage ledger flushes on close)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from gateway.errors import UpstreamUnavailable


def shutting_down() -> UpstreamUnavailable:
    return UpstreamUnavailable("the gateway is shutting down; retry on another instance", headers={"Retry-After": "1"})


class Lifecycle:
    def __init__(self) -> None:
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._running: set[asyncio.Task[object]] = set()
        self._ended: set[asyncio.Task[object]] = set()  # cancelled by end_remaining, not by their client

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count a completion for as long as it runs; refuse new ones once draining."""
        if self.draining:
            raise shutting_down()
        task = asyncio.current_task()
        assert task is not None  # a request handler runs in a task
        self._idle.clear()
        self._running.add(task)
        try:
            yield
        finally:
            self._running.discard(task)
            self._ended.discard(task)
            if not self._running:
                self._idle.set()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking requests and wait for those in flight; False if some were still running at the timeout."""
        self.draining = True
        return await self.wait_idle(timeout_s)

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def end_remaining(self) -> None:
        """Cancel the requests still running after the drain; each answers 503 (see `ended_by_shutdown`)."""
        for task in self._running:
            self._ended.add(task)
            task.cancel()

    def ended_by_shutdown(self) -> bool:
        """Whether the current request's cancellation is end_remaining's (not its client leaving); if so, the
        cancellation is taken back so the request can still send its 503."""
        task = asyncio.current_task()
        if task is None or task not in self._ended:
            return False
        self._ended.discard(task)
        task.uncancel()
        return True
