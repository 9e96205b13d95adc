"""Concurrency limits per model and per account, with a bounded wait queue that is fair between accounts.

A request runs when its model is under `max_concurrent` and its account under `max_concurrent_per_account`;
otherwise it waits. Waiting requests are kept per account, and a freed slot goes to the accounts in turn
(round robin), so one account with hundreds of queued requests delays another account's first request by
at most one slot. A full queue, or a deadline reached while waiting, is 429 naming the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.errors import RateLimited

ANONYMOUS = ""  # the account of requests that name none


@dataclass
class _Waiter:
    account: str
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ModelAdmission:
    def __init__(
        self, model_id: str, max_concurrent: int | None, per_account: int | None, max_queued: int, retry_after_s: int
    ) -> None:
        self.model_id = model_id
        self.max_concurrent = max_concurrent
        self.per_account = per_account
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.running = 0
        self._running_by_account: dict[str, int] = {}
        self._waiting: OrderedDict[str, deque[_Waiter]] = OrderedDict()  # account → its waiters; order = turn
        self.queued = 0

    @contextlib.asynccontextmanager
    async def slot(self, account: str | None, deadline: float) -> AsyncIterator[None]:
        """Hold a slot for the body of the `async with`; waits (up to the deadline) when over a limit."""
        key = account or ANONYMOUS
        await self._acquire(key, deadline)
        try:
            yield
        finally:
            self._release(key)

    # ---- internals ----------------------------------------------------------------------------

    def _has_room(self, account: str) -> bool:
        if self.max_concurrent is not None and self.running >= self.max_concurrent:
            return False
        return self.per_account is None or self._running_by_account.get(account, 0) < self.per_account

    def _blocking_limit(self, account: str) -> str:
        if self.max_concurrent is not None and self.running >= self.max_concurrent:
            return f"model '{self.model_id}' is at its limit of {self.max_concurrent} concurrent requests"
        return f"account '{account or '(none)'}' is at its limit of {self.per_account} concurrent requests"

    def _start(self, account: str) -> None:
        self.running += 1
        self._running_by_account[account] = self._running_by_account.get(account, 0) + 1

    async def _acquire(self, account: str, deadline: float) -> None:
        if self._has_room(account) and account not in self._waiting:
            self._start(account)
            return
        if self.queued >= self.max_queued:
            raise self._limited(f"{self._blocking_limit(account)} and its queue of {self.max_queued} is full")
        limit = self._blocking_limit(account)
        waiter = _Waiter(account)
        self._waiting.setdefault(account, deque()).append(waiter)
        self.queued += 1
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(waiter.granted)  # shielded: only we cancel it, after leaving the queue
        except BaseException as error:
            if waiter.granted.done():
                self._release(account)  # granted just as the deadline or a cancellation came: pass the slot on
            else:
                waiter.granted.cancel()
                self._forget(waiter)
            if isinstance(error, TimeoutError):
                raise self._limited(f"{limit}; no slot freed before the request's deadline") from None
            raise

    def _forget(self, waiter: _Waiter) -> None:
        queue = self._waiting.get(waiter.account)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            self.queued -= 1
            if not queue:
                del self._waiting[waiter.account]

    def _release(self, account: str) -> None:
        self.running -= 1
        left = self._running_by_account[account] - 1
        if left:
            self._running_by_account[account] = left
        else:
            del self._running_by_account[account]
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to waiting accounts in turn: the first eligible account gets one, then goes last."""
        progressed = True
        while progressed and self._waiting:
            progressed = False
            for account in list(self._waiting):
                if not self._has_room(account):
                    if self.max_concurrent is not None and self.running >= self.max_concurrent:
                        return
                    continue
                queue = self._waiting[account]
                waiter = queue.popleft()
                self.queued -= 1
                del self._waiting[account]
                if queue:
                    self._waiting[account] = queue  # to the back of the turn order
                self._start(account)
                waiter.granted.set_result(None)
                progressed = True
                break

    def _limited(self, message: str) -> RateLimited:
        return RateLimited(message, param=None, headers={"Retry-After": str(self.retry_after_s)})
