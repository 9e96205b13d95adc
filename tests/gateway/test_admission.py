"""Concurrency limits and the fair wait queue, on their own (no server: asyncio only)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.admission import ModelAdmission
from gateway.errors import RateLimited


async def _hold(admission: ModelAdmission, account: str, order: list[str], release: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    async with admission.slot(account, loop.time() + 30):
        order.append(account)
        await release.wait()


def test_a_flooding_account_delays_another_accounts_first_request_by_at_most_one_slot() -> None:
    async def run() -> list[str]:
        admission = ModelAdmission("m", max_concurrent=1, per_account=None, max_queued=500, retry_after_s=1)
        order: list[str] = []
        releases = [asyncio.Event() for _ in range(202)]
        tasks = [asyncio.create_task(_hold(admission, "flood", order, releases[i])) for i in range(201)]
        await asyncio.sleep(0)
        assert admission.running == 1 and admission.queued == 200
        tasks.append(asyncio.create_task(_hold(admission, "other", order, releases[201])))
        await asyncio.sleep(0)
        for _ in range(4):  # let four requests finish, one at a time
            for release in releases:
                if not release.is_set():
                    release.set()
                    break
            await asyncio.sleep(0.01)
        for release in releases:
            release.set()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(run())
    # "flood" was running and 200 of its requests were queued when "other" arrived: one more "flood"
    # request (the one whose turn it was) goes first, then "other".
    assert order.index("other") == 2


def test_per_account_limit_lets_other_accounts_through() -> None:
    async def run() -> tuple[int, int]:
        admission = ModelAdmission("m", max_concurrent=None, per_account=1, max_queued=10, retry_after_s=1)
        order: list[str] = []
        release = asyncio.Event()
        tasks = [asyncio.create_task(_hold(admission, a, order, release)) for a in ("a", "a", "b")]
        await asyncio.sleep(0.01)
        running, queued = admission.running, admission.queued
        release.set()
        await asyncio.gather(*tasks)
        return running, queued

    assert asyncio.run(run()) == (2, 1)  # a and b run; a's second waits for a's first


def test_a_full_queue_is_429_naming_the_limit_with_retry_after() -> None:
    async def run() -> RateLimited:
        admission = ModelAdmission("m", max_concurrent=1, per_account=None, max_queued=1, retry_after_s=3)
        release = asyncio.Event()
        order: list[str] = []
        tasks = [asyncio.create_task(_hold(admission, "a", order, release)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(RateLimited) as caught:
            await _hold(admission, "b", order, release)
        release.set()
        await asyncio.gather(*tasks)
        assert admission.running == 0 and admission.queued == 0
        return caught.value

    error = asyncio.run(run())
    assert error.status == 429 and error.headers == {"Retry-After": "3"}
    assert error.message == "model 'm' is at its limit of 1 concurrent requests and its queue of 1 is full"


def test_waiting_ends_at_the_deadline_and_cancelled_waiters_leave_the_queue() -> None:
    async def run() -> str:
        admission = ModelAdmission("m", max_concurrent=1, per_account=None, max_queued=10, retry_after_s=1)
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(admission, "a", [], release))
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        with pytest.raises(RateLimited) as caught:
            async with admission.slot("b", loop.time() + 0.05):
                pass
        cancelled = asyncio.create_task(_hold(admission, "c", [], release))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert admission.queued == 0
        release.set()
        await holder
        assert admission.running == 0
        return caught.value.message

    assert asyncio.run(run()).endswith("no slot freed before the request's deadline")
