"""Writes usage records off the response path: a bounded in-memory queue, batched inserts, retries.

`record()` never waits. A background task inserts batches of up to `batch_size` rows every
`flush_interval_s` (sooner when a batch is full). When the database fails, the rows stay queued and the
batch is retried every `retry_s` until it succeeds: nothing is lost while the gateway runs. A row the
database refuses for its own content is set aside (logged in full, counted), never retried forever in
front of every later row. On shutdown the queue is flushed; rows the database still cannot take are
written to a spill file under the data directory and loaded back into the queue at the next start (the
file is removed once they are stored). Only a full queue (`queue_size` rows waiting: the database has been
down for a long time) drops rows, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
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
        self._retiring: asyncio.Task[None] | None = None
        self._spills: list[Path] = []  # the spill files loaded at start, until their rows are stored
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
        spills, records = self._load_spill()
        for record in records:
            self.record(record)
        try:  # the schema, for /v4/usage before the first row; on failure the first write tries again
            await self.database.run(self.database.migrate)
            self._migrated = True
        except Exception as error:
            log.warning("usage ledger: %s is unavailable at start (%s: %s)", self.database.describe(),
                        type(error).__name__, error)  # fmt: skip
        self._task = asyncio.create_task(self._run(), name="usage-ledger")
        self._spills = spills
        if spills:
            self._retiring = asyncio.create_task(self._remove_when_stored(spills, self._enqueued))

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
        for task in (self._task, self._retiring):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if not flushed and self._pending:
            self._spill()
        # The rows of the files loaded at start are stored by now, or in the new spill file.
        for path in self._spills:
            path.unlink(missing_ok=True)
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
                await self._write(batch)
            except Exception as error:
                self.metrics.ledger_write_failures.inc()
                log.warning("usage ledger write of %d rows failed (%s: %s); retrying in %g s", len(batch),
                            type(error).__name__, error, self.retry_s)  # fmt: skip
                await asyncio.sleep(self.retry_s)
                continue
            for _ in batch:
                self._pending.popleft()
            self.metrics.ledger_pending.set(len(self._pending))
            async with self._progress:
                self._settled += len(batch)
                self._progress.notify_all()

    async def _write(self, batch: list[UsageRecord]) -> None:
        """Store the batch, or raise to have it retried; rows the database refuses are set aside."""
        if not self._migrated:
            await self.database.run(self.database.migrate)
            self._migrated = True
        started, cpu = time.perf_counter(), time.thread_time()
        records, rows = [], []
        for record in batch:
            try:
                rows.append(record.row())
                records.append(record)
            except (ValueError, TypeError, OverflowError) as error:  # e.g. a spilled row edited by hand
                self._set_aside(record, error)
        self.metrics.ledger_cpu_seconds.inc(time.thread_time() - cpu)
        try:
            await self.database.run(functools.partial(self._insert, rows))
        except Exception as error:
            if not self.database.refuses_rows(error):
                raise
            await self._write_one_by_one(records, rows)
        self.metrics.ledger_write_seconds.observe(time.perf_counter() - started)
        self.metrics.ledger_rows_written.inc(len(records))

    def _set_aside(self, record: UsageRecord, error: Exception) -> None:
        self.metrics.ledger_refused.inc()
        log.error("usage ledger: a row that cannot be stored, set aside (%s: %s): %s", type(error).__name__, error,
                  json.dumps(asdict(record), default=str))  # fmt: skip

    async def _write_one_by_one(self, batch: list[UsageRecord], rows: list[tuple[object, ...]]) -> None:
        """Find the rows the database refuses and set them aside (stored rows are skipped when a retry
        repeats them: inserts are idempotent per record_id)."""
        for record, row in zip(batch, rows, strict=True):
            try:
                await self.database.run(functools.partial(self._insert, [row]))
            except Exception as error:
                if not self.database.refuses_rows(error):
                    raise
                self._set_aside(record, error)

    def _insert(self, rows: list[tuple[object, ...]]) -> None:
        """In the database's thread; its CPU time is counted (the gateway's share of what the ledger costs)."""
        started = time.thread_time()
        try:
            self.database.insert(rows)
        finally:
            self.metrics.ledger_cpu_seconds.inc(time.thread_time() - started)

    # ---- spill files ----------------------------------------------------------------------------

    def _spill(self) -> None:
        """Written whole or not at all (a temporary file, synced, then renamed): a cut file must never be
        what the next start finds."""
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        name = f"ledger-spill-{time.time_ns()}.jsonl"
        partial = self.spill_dir / f".{name}.partial"
        with partial.open("w") as handle:
            for record in self._pending:
                handle.write(json.dumps(asdict(record)) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        partial.rename(self.spill_dir / name)
        log.error("usage ledger: the database is unavailable; %d rows kept in %s for the next start",
                  len(self._pending), self.spill_dir / name)  # fmt: skip

    def _load_spill(self) -> tuple[list[Path], list[UsageRecord]]:
        """The spill files and their rows; a line that does not parse is logged and skipped (the file was
        damaged outside the gateway), never a reason not to start."""
        files, records = [], []
        for path in sorted(self.spill_dir.glob("ledger-spill-*.jsonl")):
            loaded, damaged = 0, 0
            for line in path.read_text(errors="replace").splitlines():
                if not line:
                    continue
                try:
                    record = UsageRecord(**json.loads(line))
                    record.row()  # a row it can store (a damaged file can hold any JSON)
                except (ValueError, TypeError, OverflowError):
                    damaged += 1
                    continue
                records.append(record)
                loaded += 1
            if damaged:
                log.error("usage ledger: %d damaged lines in %s skipped", damaged, path)
            files.append(path)
            log.info("usage ledger: %d rows from %s queued again", loaded, path.name)
        return files, records

    async def _remove_when_stored(self, spills: list[Path], target: int) -> None:
        """A spill file goes only once its rows are in the database: a crash before that reloads it, and the
        rows already stored are skipped (same record ids)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self._settled >= target)
        for path in spills:
            path.unlink(missing_ok=True)
