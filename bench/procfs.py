"""What the benchmarks read of a process from Linux's /proc: one parser for all of them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/<pid>/stat the benchmarks use (CPU in seconds)."""

    state: str
    ppid: int
    cpu_s: float
    """Its own user + system time."""
    children_cpu_s: float
    """What its waited-for children used (user + system)."""

    @property
    def alive(self) -> bool:
        return self.state != "Z"  # A zombie has exited and only waits to be reaped.


def stat(pid: int) -> Stat | None:
    """The process's stat, None if it is gone."""
    try:
        # The command name, in parentheses, may hold spaces or ')': split after the last one.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return Stat(fields[0], int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS,
                    (int(fields[13]) + int(fields[14])) / TICKS)
    except (OSError, IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    found = stat(pid)
    return found is not None and found.alive


def pids() -> Iterator[int]:
    """Every process's pid."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def comm(pid: int) -> str:
    """Its command name, "?" if it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
