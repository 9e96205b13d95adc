"""Graceful shutdown: on SIGTERM the gateway stops taking completions (503), lets the ones in flight finish
up to `drain_timeout_s`, then closes (the usage ledger flushes on close)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from gateway.errors import UpstreamUnavailable


class Lifecycle:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count a completion for as long as it runs; refuse new ones once draining."""
        if self.draining:
            raise UpstreamUnavailable("the gateway is shutting down; retry on another instance",
                                      headers={"Retry-After": "1"})  # fmt: skip
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Stop taking requests and wait for those in flight; False if some were still running at the timeout."""
        self.draining = True
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
