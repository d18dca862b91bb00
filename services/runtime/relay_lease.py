"""Which replica's relay publishes a store: the one holding its lease, one at a time.

Replicas of a service share one store, and any of them may record events in it; one relay
publishes them all, in notification order, and records the position. The lease is a lock the
database or the kernel keeps for a live holder only, so a dead holder's lease goes with it:

- PostgreSQL: a session-level advisory lock (`pg_try_advisory_lock`, keyed by the store's
  schema) on a connection the relay keeps. It ends with the session: the holder's exit, a
  kill -9, or (keepalives set below) its machine vanishing within seconds.
- SQLite: `flock` on `<database>.relay-lock` beside the database (replicas of a SQLite store
  are on one machine). The kernel drops it when the holder's process ends, however it ends.

A lease never decides correctness on its own: two relays at once (a holder that lost its
connection and has not noticed yet) publish duplicates JetStream drops by `Nats-Msg-Id`, and
the position is the highest recorded, so it only moves forward.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path
from typing import IO, Any, Protocol

log = logging.getLogger(__name__)


class RelayLease(Protocol):
    def take(self) -> bool:
        """True if this process holds the lease now (taking it if free); cheap when held."""

    def release(self) -> None: ...


class FileLease:
    """`flock` on a file beside a SQLite database: held by one open file at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def take(self) -> bool:
        if self._handle is not None:
            return True
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return True

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # Closing the file drops the lock.
            self._handle = None


class PostgresLease:
    """A session-level advisory lock on a connection of its own, checked alive before it counts."""

    def __init__(self, connect_kwargs: dict[str, Any], key: int) -> None:
        self._connect_kwargs = connect_kwargs
        self.key = key
        self._connection: Any = None
        self._held = False

    def take(self) -> bool:
        import psycopg

        try:
            if self._connection is None or self._connection.closed:
                self._held = False
                self._connection = psycopg.connect(**self._connect_kwargs, autocommit=True, connect_timeout=5,
                                                   keepalives=1, keepalives_idle=5, keepalives_interval=2,
                                                   keepalives_count=3)
                _server_keepalives(self._connection)
            if self._held:
                self._connection.execute("SELECT 1")  # Still connected, so still holding.
                return True
            row = self._connection.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
            self._held = bool(row and row[0])
            return self._held
        except psycopg.Error as error:
            log.warning("relay lease: PostgreSQL unreachable (%s); not publishing until it is back", error)
            self.release()
            return False

    def release(self) -> None:
        self._held = False
        if self._connection is not None:
            try:
                self._connection.close()  # The session ends: so does its advisory lock.
            finally:
                self._connection = None


def _server_keepalives(connection: Any) -> None:
    """Ask the server to notice a vanished holder (its machine gone) within ~11 s too; a server
    that refuses keeps its own keepalive settings (minutes), which only delays a takeover."""
    import psycopg

    try:
        for name, value in (("idle", 5), ("interval", 2), ("count", 3)):
            connection.execute(f"SET tcp_keepalives_{name} = {value}")
    except psycopg.Error as error:
        log.info("relay lease: PostgreSQL keeps its own TCP keepalives (%s)", error)


def lease_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for a store (PostgreSQL's bigint)."""
    return int.from_bytes(hashlib.sha256(f"baton relay {name}".encode()).digest()[:8], "big", signed=True)


def lease_for(env: dict[str, str] | Any) -> RelayLease | None:
    """The lease of the store configured by `env` (its `eventsourcing` environment), or None for
    a store only one process can open (in memory): then the relay always publishes."""
    module = env.get("PERSISTENCE_MODULE", "")
    if module == "eventsourcing.postgres":
        connect = {"dbname": env["POSTGRES_DBNAME"], "host": env["POSTGRES_HOST"], "port": env["POSTGRES_PORT"],
                   "user": env["POSTGRES_USER"], "password": env.get("POSTGRES_PASSWORD") or None}
        return PostgresLease(connect, lease_key(f"{env['POSTGRES_DBNAME']}/{env.get('POSTGRES_SCHEMA', '')}"))
    if module == "eventsourcing.sqlite":
        name = env.get("SQLITE_DBNAME", "")
        if not name or ":memory:" in name or "mode=memory" in name:
            return None
        return FileLease(Path(name).with_name(Path(name).name + ".relay-lock"))
    return None
