"""The audit log: every event of every task, append-only, in stream order, hash-chained.

Each record carries `hash = sha256(prev_hash, stream_seq, canonical envelope)`, so altering,
deleting or reordering a record breaks the chain from there on. The log is a pure function of
the stream: rebuilt from it, it is identical.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from eventsourcing.persistence import Tracking

from events import Envelope
from projections.sql import Database, TrackedProjection

GENESIS = "0" * 64
MAX_PAGE = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_log (
    stream_seq BIGINT PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    task_id TEXT NOT NULL,
    type TEXT NOT NULL,
    actor TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    causation_id TEXT,
    envelope TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_task ON audit_log (task_id, stream_seq);
CREATE INDEX IF NOT EXISTS audit_by_type ON audit_log (type, stream_seq);
CREATE INDEX IF NOT EXISTS audit_by_actor ON audit_log (actor, stream_seq);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit_log (occurred_at)
"""


def canonical(envelope: dict[str, Any]) -> str:
    """The one text of an envelope that is hashed and compared: sorted keys, no spaces."""
    return json.dumps(envelope, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(prev_hash: str, stream_seq: int, envelope_text: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{stream_seq}\n{envelope_text}".encode()).hexdigest()


class AuditLog(TrackedProjection):
    SCHEMA = _SCHEMA
    TRACKING_TABLE = "audit_tracking"

    # -- writing (the projector) -------------------------------------------------------

    def append(self, envelope: Envelope, tracking: Tracking) -> None:
        """Append one event (its stream sequence is the tracking position), atomically with it."""
        self.append_batch([(envelope, tracking)])

    def append_batch(self, items: list[tuple[Envelope, Tracking]]) -> None:
        """Append events in stream order, with the last position, in one transaction."""
        with self._db.transaction() as db:
            # Checked inside the transaction: a rebuild may have written these positions meanwhile.
            position = self.position(items[0][1].application_name, db)
            fresh = [(e.model_dump(mode="json"), t.notification_id) for e, t in items
                     if t.notification_id > position]
            if fresh:
                self._append_all(db, fresh)
                self.track(db, items[-1][1])

    def rebuild(self, records: Iterator[tuple[int, dict[str, Any]]], *, consumer: str) -> int:
        """Replace the whole log with `records` (stream_seq, envelope) in one transaction.

        The consumer's position moves to the last sequence, so the projector carries on after it.
        """
        ordered = [(envelope, stream_seq) for stream_seq, envelope in records]
        with self._db.transaction() as db:
            db.execute("DELETE FROM audit_log")
            self._append_all(db, ordered)
            db.execute(f"DELETE FROM {self.TRACKING_TABLE}")
            self.track(db, Tracking(consumer, ordered[-1][1] if ordered else 0))
        return len(ordered)

    @staticmethod
    def _append_all(db: Database, records: list[tuple[dict[str, Any], int]]) -> None:
        """Insert (envelope, stream_seq) records, each chained to the one before."""
        last = db.execute("SELECT hash FROM audit_log ORDER BY stream_seq DESC LIMIT 1")
        prev = last[0]["hash"] if last else GENESIS
        rows = []
        for envelope, stream_seq in records:
            text = canonical(envelope)
            digest = chain_hash(prev, stream_seq, text)
            rows.append((stream_seq, envelope["event_id"], envelope["task_id"], envelope["type"],
                         envelope["actor"], _utc_text(envelope["occurred_at"]),
                         envelope.get("causation_id"), text, prev, digest))
            prev = digest
        db.executemany(
            "INSERT INTO audit_log (stream_seq, event_id, task_id, type, actor, occurred_at, "
            "causation_id, envelope, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    # -- reading (the API, the CLI, verify) ----------------------------------------------

    def query(
        self,
        *,
        task_id: str | None = None,
        type: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Events in stream order matching every filter given, after `after_seq`."""
        clauses, params = ["stream_seq > ?"], [after_seq]
        for column, value in (("task_id", task_id), ("type", type), ("actor", actor)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            clauses.append("occurred_at >= ?")
            params.append(_utc_text(since))
        if until is not None:
            clauses.append("occurred_at < ?")
            params.append(_utc_text(until))
        rows = self._db.execute(
            f"SELECT stream_seq, envelope FROM audit_log WHERE {' AND '.join(clauses)} "
            "ORDER BY stream_seq LIMIT ?",
            (*params, min(limit, MAX_PAGE)),
        )
        return [json.loads(row["envelope"]) | {"stream_seq": row["stream_seq"]} for row in rows]

    def records(self, batch: int = 1000) -> Iterator[dict[str, Any]]:
        """Every raw record in stream order (for verify and export)."""
        after = 0
        while rows := self._db.execute(
            "SELECT * FROM audit_log WHERE stream_seq > ? ORDER BY stream_seq LIMIT ?", (after, batch)
        ):
            yield from rows
            after = rows[-1]["stream_seq"]


_UTC_TEXT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def _utc_text(value: datetime | str) -> str:
    """ISO-8601 in UTC with microseconds, so text order is time order."""
    if isinstance(value, str) and _UTC_TEXT.fullmatch(value):
        return value  # Already that form (as envelopes carry their times).
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        raise ValueError(f"time {value!r} has no timezone")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
