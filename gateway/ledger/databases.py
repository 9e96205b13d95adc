"""The ledger's databases: SQLite (WAL mode, the default) and PostgreSQL, one schema, one set of migrations.

Each database runs on its own single worker thread (the drivers are blocking); the async side submits work
to it. A failed operation drops the connection, and the next one reconnects: a database that went away and
came back needs nothing else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

from gateway.ledger.records import COLUMNS

T = TypeVar("T")
GroupBy = Literal["model", "day"]


@dataclass(frozen=True)
class UsageQuery:
    start: float  # Unix time, inclusive
    end: float  # Unix time, exclusive
    group_by: GroupBy
    account_id: str | None = None  # one account, or
    accounts: frozenset[str] | None = None  # only these (a restricted key's accounts); None: all


@dataclass(frozen=True)
class UsageTotal:
    key: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


def migrations() -> list[tuple[int, str]]:
    folder = resources.files("gateway.ledger") / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(int(f.name.split("_", 1)[0]), f.read_text()) for f in files]


class LedgerDatabase(ABC):
    placeholder = "?"
    name = "database"

    def __init__(self) -> None:
        self._connection: Any = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ledger-{self.name}")

    @abstractmethod
    def _connect(self) -> Any: ...

    @abstractmethod
    def describe(self) -> str:
        """Where the rows go, for logs (never with a password)."""

    @abstractmethod
    def _run_script(self, connection: Any, script: str) -> None: ...

    @abstractmethod
    def refuses_rows(self, error: Exception) -> bool:
        """The database refused the rows themselves (a value it cannot store): retrying cannot help, unlike
        an error of the connection or of the server."""

    async def run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)

    def close(self) -> None:
        self._thread.submit(self._disconnect).result()
        self._thread.shutdown(wait=True)

    # ---- on the worker thread -----------------------------------------------------------------

    def _with_connection(self, work: Callable[[Any], T]) -> T:
        if self._connection is None:
            self._connection = self._connect()
        try:
            return work(self._connection)
        except BaseException:
            self._disconnect()
            raise

    def _disconnect(self) -> None:
        if self._connection is not None:
            # A dead connection may fail to roll back or close; it is gone either way. A live one rolls back
            # first: SQLite keeps a failed statement's transaction (and its write lock) open otherwise, for as
            # long as the error's traceback holds the cursor.
            with contextlib.suppress(Exception):
                self._connection.rollback()
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None

    def migrate(self) -> list[int]:
        """Apply the migrations not applied yet; return their versions."""

        def work(connection: Any) -> list[int]:
            self._run_script(
                connection,
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL);",
            )
            cursor = connection.cursor()
            cursor.execute("SELECT version FROM schema_migrations")
            applied = {row[0] for row in cursor.fetchall()}
            connection.commit()
            done = []
            for version, script in migrations():
                if version in applied:
                    continue
                self._run_script(connection, script)
                cursor.execute(
                    f"INSERT INTO schema_migrations (version, applied_at) VALUES ({self.placeholder}, "
                    f"{self.placeholder})",
                    (version, time.time()),
                )
                connection.commit()
                done.append(version)
            return done

        return self._with_connection(work)

    def insert(self, rows: Sequence[tuple[object, ...]]) -> None:
        """All rows in one transaction; rows already stored (same record_id) are skipped, so retrying a batch
        whose commit was lost with the connection stores nothing twice."""
        marks = ", ".join([self.placeholder] * len(COLUMNS))
        sql = f"INSERT INTO usage_records ({', '.join(COLUMNS)}) VALUES ({marks}) ON CONFLICT (record_id) DO NOTHING"

        def work(connection: Any) -> None:
            cursor = connection.cursor()
            cursor.executemany(sql, rows)
            connection.commit()

        self._with_connection(work)

    def usage(self, query: UsageQuery) -> list[UsageTotal]:
        column = {"model": "model", "day": "day"}[query.group_by]  # never user text in SQL
        where = [f"created_at >= {self.placeholder}", f"created_at < {self.placeholder}"]
        params: list[object] = [query.start, query.end]
        if query.account_id is not None:
            where.append(f"account_id = {self.placeholder}")
            params.append(query.account_id)
        if query.accounts is not None:
            if not query.accounts:
                return []
            where.append(f"account_id IN ({', '.join([self.placeholder] * len(query.accounts))})")
            params.extend(sorted(query.accounts))
        sql = (
            f"SELECT {column}, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM usage_records "
            f"WHERE {' AND '.join(where)} GROUP BY {column} ORDER BY {column}"
        )

        def work(connection: Any) -> list[UsageTotal]:
            cursor = connection.cursor()
            cursor.execute(sql, params)
            rows = cursor.fetchall()
            connection.commit()
            return [UsageTotal(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]

        return self._with_connection(work)

    def rows(self) -> list[dict[str, object]]:
        """Every stored row (for tests and audits; not for the hot path)."""

        def work(connection: Any) -> list[dict[str, object]]:
            cursor = connection.cursor()
            cursor.execute(f"SELECT {', '.join(COLUMNS)} FROM usage_records ORDER BY created_at")
            result = [dict(zip(COLUMNS, row, strict=True)) for row in cursor.fetchall()]
            connection.commit()
            return result

        return self._with_connection(work)


class SQLiteLedger(LedgerDatabase):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=0.5, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    def describe(self) -> str:
        return f"sqlite (WAL) at {self.path}"

    def _run_script(self, connection: Any, script: str) -> None:
        connection.executescript(script)

    def refuses_rows(self, error: Exception) -> bool:
        # OverflowError: an integer past SQLite's 64 bits, refused while binding the row.
        return isinstance(error, (sqlite3.DataError, sqlite3.IntegrityError, OverflowError))


class PostgresLedger(LedgerDatabase):
    placeholder = "%s"
    name = "postgresql"

    def __init__(self, dsn: str, connect_timeout_s: int = 3) -> None:
        super().__init__()
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, connect_timeout=self.connect_timeout_s, application_name="gateway-ledger")

    def describe(self) -> str:
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(self.dsn)
        return f"postgresql at {info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    def _run_script(self, connection: Any, script: str) -> None:
        connection.execute(script)
        connection.commit()

    def refuses_rows(self, error: Exception) -> bool:
        from psycopg import errors

        # SQLSTATE classes 22 (data exception), 23 (integrity) and 54 (program limit, e.g. an index row too big).
        return isinstance(error, (errors.DataError, errors.IntegrityError, errors.ProgramLimitExceeded))


def open_ledger_database(dsn: str | None, data_dir: Path) -> LedgerDatabase:
    if dsn:
        if not dsn.startswith(("postgresql://", "postgres://")):
            raise ValueError("ledger_dsn must be a postgresql:// URL")
        return PostgresLedger(dsn)
    return SQLiteLedger(data_dir / "ledger.sqlite3")
