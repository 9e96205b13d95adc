"""Processes as /proc (Linux) shows them: the tree below a process (tritonserver and its model stubs), and CPU
time, what a benchmark's parts cost per request (less noisy than throughput on a shared machine)."""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) may hold spaces or parentheses: split after its closing parenthesis.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (all its threads) so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """The processes below pid now (Triton's model stubs below tritonserver)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat_fields(int(entry.name))[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    pending = list(children.get(pid, []))
    while pending:
        child = pending.pop()
        found.append(child)
        pending += children.get(child, [])
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of pid and the processes below it that are still running."""
    total = 0.0
    for member in (pid, *descendants(pid)):
        try:
            total += cpu_seconds(member)
        except OSError:
            continue  # exited meanwhile
    return total
