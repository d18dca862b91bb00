"""The processes of a data dir: found by their environment, stopped together.

Every process `baton up` starts, and every process those start (vm_agents, their agents, whatever
the agents run), carries `BATON_SUPERVISOR_PID` and the data dir in its environment, which is how
it is found again (also after the `baton up` that started it is gone). Linux's /proc only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

SUPERVISOR_PID_ENV = "BATON_SUPERVISOR_PID"
"""Set in the environment of every process `baton up` starts (and so of theirs): whose it is."""

STOP_DEADLINE_S = 6.0
"""How long the services, and then the vm_agents, get to exit on SIGTERM before SIGKILL. A
service gives itself less (`SERVICE_STOP_GRACE_S`), so this is only reached by a stuck one."""

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; False elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of a live process; None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else (fields[0], int(fields[2]))


def process_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def data_dir_processes(data_dir: Path) -> dict[int, int]:
    """{pid: process group} of every live process a `baton up` on `data_dir` started, directly or
    not (its environment has BATON_SUPERVISOR_PID and this BATON_DATA_DIR), except this one."""
    wanted = os.path.realpath(data_dir)
    found: dict[int, int] = {}
    if not Path("/proc/self/environ").exists():
        return found  # No procfs (not Linux): only what `baton up` started itself is stopped.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        env = process_environ(int(entry.name))
        if SUPERVISOR_PID_ENV not in env or "BATON_DATA_DIR" not in env:
            continue
        if os.path.realpath(env["BATON_DATA_DIR"]) != wanted:
            continue
        state = process_state(int(entry.name))
        if state is not None:
            found[int(entry.name)] = state[1]
    return found


def signal_process(pid: int, sig: int, *, group: bool) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_data_dir_processes(data_dir: Path, *, deadline_s: float = STOP_DEADLINE_S,
                            spare: frozenset[int] = frozenset()) -> tuple[int, int]:
    """SIGTERM every process of `data_dir` (but `spare`) at once, wait for them under one
    deadline, then SIGKILL what is left; (how many there were, how many had to be killed).

    A process group led by one of them is signalled whole (a vm_agent, an agent: each leads a
    session of its own), so what they started goes too; one that appears meanwhile (an agent's
    child) is signalled as soon as it is seen."""
    own_group = os.getpgrp()

    def find() -> dict[int, int]:
        return {pid: pgid for pid, pgid in data_dir_processes(data_dir).items() if pid not in spare}

    seen: set[int] = set()
    killed: set[int] = set()
    deadline = time.monotonic() + deadline_s
    for sig in (signal.SIGTERM, signal.SIGKILL):
        signalled: set[int] = set()
        while True:
            targets = find()
            for pid, pgid in targets.items():
                if pid not in signalled:
                    signalled.add(pid)
                    signal_process(pid, sig, group=pid == pgid and pgid != own_group)
            seen |= targets.keys()
            if sig == signal.SIGKILL:
                killed |= targets.keys()
            if not targets or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if not targets:
            break
        deadline = time.monotonic() + 5.0  # After SIGKILL: only as long as the kernel takes.
    return len(seen), len(killed)
