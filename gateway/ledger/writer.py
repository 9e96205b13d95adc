"""Writes usage records off the response path: a bounded in-memory queue, batched inserts, retries.

`record()` never waits. A background task inserts batches of up to `batch_size` rows every
`flush_interval_s` (sooner when a batch is full). When the database fails, the rows stay queued and the
batch is retried every `retry_s` until it succeeds: nothing is lost while the gateway runs. On shutdown the
queue is flushed; rows the database still cannot take are written to a spill file under the data
directory and loaded back into the queue at the next start. Only a full queue (`queue_size` rows waiting:
the database has been down for a long time) drops rows, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

from gateway.ledger.databases import LedgerDatabase
from gateway.ledger.records import UsageRecord
from gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)


class LedgerWriter:
    def __init__(
        self,
        database: LedgerDatabase,
        metrics: GatewayMetrics,
        spill_dir: Path,
        batch_size: int = 256,
        flush_interval_s: float = 0.5,
        queue_size: int = 100_000,
        retry_s: float = 1.0,
    ) -> None:
        self.database = database
        self.metrics = metrics
        self.spill_dir = spill_dir
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.queue_size = queue_size
        self.retry_s = retry_s
        self._pending: deque[UsageRecord] = deque()
        self._enqueued = 0  # records accepted (or dropped) so far
        self._settled = 0  # records written (or dropped) so far
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._migrated = False

    # ---- the response path ----------------------------------------------------------------------

    def record(self, record: UsageRecord) -> None:
        started = time.thread_time()
        try:
            self._record(record)
        finally:
            self.metrics.ledger_cpu_seconds.inc(time.thread_time() - started)

    def _record(self, record: UsageRecord) -> None:
        self._enqueued += 1
        if len(self._pending) >= self.queue_size:
            self._settled += 1
            self.metrics.ledger_dropped.inc()
            log.error("usage ledger queue full (%d rows): dropped the row of request %s", self.queue_size,
                      record.request_id)  # fmt: skip
            return
        self._pending.append(record)
        self.metrics.ledger_pending.set(len(self._pending))
        if len(self._pending) >= self.batch_size:
            self._wake.set()

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        for record in self._load_spill():
            self.record(record)
        self._task = asyncio.create_task(self._run(), name="usage-ledger")

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every record accepted so far is in the database; False if timeout_s passed first."""
        target = self._enqueued
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s):
                async with self._progress:
                    await self._progress.wait_for(lambda: self._settled >= target)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout_s: float = 10.0) -> None:
        """Flush (up to timeout_s), stop, and spill what the database could not take."""
        flushed = await self.flush(timeout_s)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not flushed and self._pending:
            self._spill()
        await asyncio.to_thread(self.database.close)

    # ---- the background task ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._pending:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_interval_s):
                        await self._wake.wait()
                self._wake.clear()
                continue
            if len(self._pending) < self.batch_size and not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_interval_s):
                        await self._wake.wait()
            self._wake.clear()
            batch = [self._pending[i] for i in range(min(self.batch_size, len(self._pending)))]
            try:
                if not self._migrated:
                    await self.database.run(self.database.migrate)
                    self._migrated = True
                started, cpu = time.perf_counter(), time.thread_time()
                rows = [r.row() for r in batch]
                self.metrics.ledger_cpu_seconds.inc(time.thread_time() - cpu)
                await self.database.run(functools.partial(self._insert, rows))
            except Exception as error:
                self.metrics.ledger_write_failures.inc()
                log.warning("usage ledger write of %d rows failed (%s: %s); retrying in %g s", len(batch),
                            type(error).__name__, error, self.retry_s)  # fmt: skip
                await asyncio.sleep(self.retry_s)
                continue
            self.metrics.ledger_write_seconds.observe(time.perf_counter() - started)
            for _ in batch:
                self._pending.popleft()
            self.metrics.ledger_pending.set(len(self._pending))
            self.metrics.ledger_rows_written.inc(len(batch))
            async with self._progress:
                self._settled += len(batch)
                self._progress.notify_all()

    def _insert(self, rows: list[tuple[object, ...]]) -> None:
        """In the database's thread; its CPU time is counted (the gateway's share of what the ledger costs)."""
        started = time.thread_time()
        try:
            self.database.insert(rows)
        finally:
            self.metrics.ledger_cpu_seconds.inc(time.thread_time() - started)

    # ---- spill files ----------------------------------------------------------------------------

    def _spill(self) -> None:
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"ledger-spill-{time.time_ns()}.jsonl"
        with path.open("w") as handle:
            for record in self._pending:
                handle.write(json.dumps(asdict(record)) + "\n")
        log.error("usage ledger: the database is unavailable; %d rows kept in %s for the next start",
                  len(self._pending), path)  # fmt: skip

    def _load_spill(self) -> list[UsageRecord]:
        records = []
        for path in sorted(self.spill_dir.glob("ledger-spill-*.jsonl")):
            records += [UsageRecord(**json.loads(line)) for line in path.read_text().splitlines() if line]
            path.unlink()
            log.info("usage ledger: %d rows from %s queued again", len(records), path.name)
        return records
