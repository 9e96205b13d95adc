"""Reliability tests: faults injected for real, bad clients, fuzzing, soak. Each test adds its figures to the
report that is printed at the end of the run (`make reliability` runs the long soak; `make test` the short).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPORT: list[dict[str, Any]] = []
REPORT_FILE = Path(".cache/reliability-report.json")
COLUMNS = ("check", "faults injected", "streams affected", "errors seen by clients", "recovery", "fuzz cases",
           "5xx", "soak requests", "failures", "RSS start→end")  # fmt: skip


@pytest.fixture
def report() -> Iterator[dict[str, Any]]:
    """A row of the reliability table; the test fills in what it measured."""
    row: dict[str, Any] = {}
    yield row
    if row:
        REPORT.append(row)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORT:
        return
    REPORT_FILE.parent.mkdir(parents=True, exist_ok=True)
    REPORT_FILE.write_text(json.dumps(REPORT, indent=2))
    write = terminalreporter.write_line
    write("")
    write("Reliability report (" + str(REPORT_FILE) + ")")
    write("| " + " | ".join(COLUMNS) + " |")
    write("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in REPORT:
        write("| " + " | ".join(str(row.get(column, "")) for column in COLUMNS) + " |")
