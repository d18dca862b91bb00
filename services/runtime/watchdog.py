"""A hung service is killed and restarted: systemd's watchdog protocol, spoken both ways.

A replica that hangs (SIGSTOP, a blocked event loop, a livelock) is worse than a dead one: it
keeps what only a live process should hold. Its partitions move on its heartbeats' silence
(`partitions.HeldPartitions`), but its store's relay lease (a flock, a PostgreSQL session) is
the kernel's and the database's, kept for as long as the process exists, so what the other
replicas record would wait unpublished. So a service proves it is not hung the way systemd asks
(sd_notify(3), sd_watchdog_enabled(3)): with `NOTIFY_SOCKET` and `WATCHDOG_USEC` in its
environment, its event loop sends `WATCHDOG=1` to that socket several times per interval.

- Under `baton up`, the supervisor is the listener (`WatchdogListener`): a child that has been
  heard from and then goes silent for the interval is killed (SIGKILL also ends a stopped
  process), which frees its leases, and restarted like any dead child.
- Under systemd (a service per unit, `WatchdogSec=` and `NotifyAccess=main`), systemd is the
  listener and does the same; nothing in Baton changes. `baton up` itself pings a watchdog systemd
  gives it from its supervising loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid.
PINGS_PER_INTERVAL = 4
"""How often within the interval a service says it is alive (sd_watchdog_enabled(3) asks for at
least twice): a ping delayed by a busy moment is not yet a hang."""


def watchdog_interval_s(env: Mapping[str, str] = os.environ) -> float | None:
    """The interval this process is watched with, or None when nobody watches it (no socket, no
    interval, or the interval meant for another process: `WATCHDOG_PID`)."""
    if not env.get("NOTIFY_SOCKET") or not env.get("WATCHDOG_USEC", "").isdigit():
        return None
    if env.get("WATCHDOG_PID") not in (None, "", str(os.getpid())):
        return None
    usec = int(env["WATCHDOG_USEC"])
    return usec / 1_000_000 if usec > 0 else None


def _address(name: str) -> str | bytes:
    """A socket name as sd_notify(3) takes it: a path, or `@name` in the abstract namespace."""
    return b"\0" + name[1:].encode() if name.startswith("@") else name


class WatchdogPinger:
    """What a watched process sends its watchdog: `WATCHDOG=1` every `every_s`."""

    def __init__(self, socket_name: str, interval_s: float) -> None:
        self.every_s = interval_s / PINGS_PER_INTERVAL
        self._address = _address(socket_name)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setblocking(False)
        self._last = float("-inf")

    @classmethod
    def for_this_process(cls, env: Mapping[str, str] = os.environ) -> WatchdogPinger | None:
        """The pinger `env` asks this process for, or None when nobody watches it."""
        interval_s = watchdog_interval_s(env)
        return None if interval_s is None else cls(env["NOTIFY_SOCKET"], interval_s)

    def ping(self) -> None:
        try:
            self._socket.sendto(b"WATCHDOG=1", self._address)
        except OSError as error:  # The listener is gone or busy: it judges by what arrives.
            log.debug("watchdog ping not sent: %s", error)

    def ping_if_due(self, now: float) -> None:
        """For a loop that turns more often than `every_s` (time.monotonic() as `now`)."""
        if now - self._last >= self.every_s:
            self._last = now
            self.ping()

    def close(self) -> None:
        self._socket.close()


async def feed_watchdog(env: Mapping[str, str] = os.environ) -> None:
    """Say `WATCHDOG=1` from the event loop, PINGS_PER_INTERVAL times per interval, until
    cancelled: when the loop stops turning, so do the pings. Returns at once if unwatched."""
    pinger = WatchdogPinger.for_this_process(env)
    if pinger is None:
        return
    try:
        while True:
            pinger.ping()
            await asyncio.sleep(pinger.every_s)
    finally:
        pinger.close()


class WatchdogListener:
    """The supervisor's end: one datagram socket that every child is given as `NOTIFY_SOCKET`.

    It is a file in a directory of its own, private to the user (0700, in the temp dir: a short
    path, as a socket's must be), not a name in the abstract namespace: an agent shares the host's
    network namespace, where every abstract socket is listed and reachable, and a flood from it
    would crowd the services' pings out and get them killed. An agent's sandbox has its own /tmp.
    Each ping is attributed by the kernel's record of its sender (SCM_CREDENTIALS), so a child
    cannot ping for another and nothing else can ping for one."""

    MAX_READ = 10_000
    """Datagrams read per `senders()` call: a flood cannot keep the supervisor reading."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._directory = Path(tempfile.mkdtemp(prefix="baton-watchdog-"))  # 0700
        self.name = str(self._directory / "notify")
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._socket.bind(self.name)
        self._socket.setblocking(False)

    def env(self) -> dict[str, str]:
        """What a child needs in its environment to be watched."""
        return {"NOTIFY_SOCKET": self.name, "WATCHDOG_USEC": str(int(self.interval_s * 1_000_000))}

    def senders(self) -> list[int]:
        """The pids that pinged (`WATCHDOG=1`) since the last call, oldest first."""
        pids = []
        for _ in range(self.MAX_READ):
            try:
                data, ancillary, _, _ = self._socket.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except BlockingIOError:
                break
            if b"WATCHDOG=1" not in data.split(b"\n"):
                continue
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pids.append(_UCRED.unpack(payload[:_UCRED.size])[0])
        return pids

    def close(self) -> None:
        self._socket.close()
        Path(self.name).unlink(missing_ok=True)
        self._directory.rmdir()
