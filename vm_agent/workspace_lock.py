"""One vm_agent per workspace: an assigned vm_agent holds its state dir's `vm_agent.lock` for as
long as it lives (an exclusive `flock`, released by the kernel when the process ends however it
ends), with its pid written in it.

A provisioner that died, or stalled, between assigning a warm vm_agent and recording it leaves that
vm_agent serving a task nobody knows it serves; the replica that takes the task over finds it here
(`holder`) and stops it before it assigns another (services/provisioner/local.py). A lock held is
proof of a live holder, so the pid read beside it is never a stale one reused by another process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from services.runtime.relay_lease import FileLease

LOCK_NAME = "vm_agent.lock"


class WorkspaceTaken(Exception):
    """Another live vm_agent holds the state dir."""

    def __init__(self, state_dir: Path, pid: int | None) -> None:
        self.pid = pid
        super().__init__(f"another vm_agent (pid {pid if pid is not None else 'unknown'}) serves the "
                         f"workspace of {state_dir.name}")


def hold(state_dir: Path) -> FileLease:
    """Hold `state_dir` while the returned lease is kept (its `release` lets go; so does the
    process's end). Raises WorkspaceTaken if another process holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lease = FileLease(state_dir / LOCK_NAME)  # The relays' lock on a file: flock, its holder's pid in it.
    if not lease.take():
        raise WorkspaceTaken(state_dir, holder(state_dir))
    return lease


def holder(state_dir: Path) -> int | None:
    """The pid of the live process that holds `state_dir`, None if none does (or if the holder
    cannot be told: a pid is given only once that process is seen to have the lock file open, so a
    pid left in the file by an earlier holder is never taken for the current one)."""
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # Nobody holds it (our shared lock goes with the descriptor).
        except BlockingIOError:
            pass
        with contextlib.suppress(ValueError):
            pid = int(os.pread(fd, 32, 0).decode() or "x")
            if _has_open(pid, path):
                return pid
        return None
    finally:
        os.close(fd)


def _has_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has `path` open (Linux /proc)."""
    target = str(path.resolve())
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):  # Closed meanwhile.
            if os.readlink(fd) == target:
                return True
    return False
