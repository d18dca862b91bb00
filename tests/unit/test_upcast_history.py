"""A history recorded by an earlier release (tests/fixtures/history_v1.ndjson: every event type as
written then) still rebuilds the board and the audit log, and passes verify, with today's code."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from eventsourcing.persistence import Tracking

from events import EVENT_TYPES, Envelope, parse_event
from events.versions import UPCASTERS, current_shape
from projections.audit_log import AuditLog
from projections.audit_verify import compare_with_stream, verify_chain
from projections.sql import SQLiteDatabase
from projections.task_board import PROJECTED_TYPES, TaskBoard

FIXTURES = Path(__file__).parents[1] / "fixtures"


def recorded_history() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / "history_v1.ndjson").read_text().splitlines()]


def replay(history: list[dict[str, Any]]) -> dict[str, Any]:
    """What the board, the audit log and verify say once `history` (stream order, seq = position
    + 1) is folded in as the projector folds it: each event typed first (upcast to today's shape)."""
    with tempfile.TemporaryDirectory() as scratch:
        board = TaskBoard(SQLiteDatabase(Path(scratch) / "board.sqlite"))
        audit = AuditLog(SQLiteDatabase(Path(scratch) / "audit.sqlite"))
        try:
            for seq, raw in enumerate(history, start=1):
                envelope = Envelope.model_validate(raw)
                parse_event(envelope)  # Raises for an event today's code cannot read.
                if envelope.type in PROJECTED_TYPES:  # As the consumer hands it on: in today's shape.
                    board.apply(current_shape(envelope), Tracking("board", seq))
                audit.append(envelope, Tracking("audit", seq))  # As written: its hash chain needs the bytes.
            records, chain_findings = verify_chain(audit)
            _, stream_findings = compare_with_stream(audit, enumerate(history, start=1))
            return {
                "board": {task_id: board.get(task_id) for task_id in sorted({e["task_id"] for e in history})},
                "audit": {"records": records, "last_hash": list(audit.records())[-1]["hash"],
                          "findings": [str(f) for f in (*chain_findings, *stream_findings)]},
            }
        finally:
            board.close()
            audit.close()


def test_the_recorded_history_holds_every_event_type():
    assert {e["type"] for e in recorded_history()} == set(EVENT_TYPES)


def test_the_recorded_history_rebuilds_the_board_and_the_audit_log_and_passes_verify():
    expected = json.loads((FIXTURES / "history_v1.expected.json").read_text())

    replayed = json.loads(json.dumps(replay(recorded_history())))

    assert replayed["audit"]["findings"] == []
    board = replayed["board"]
    # The answers, as a person reads the four tasks: a follow-up's turn completed last, a failure
    # with its reason and its gaps, a cancel, and a cloud task's two servers' cost.
    assert (board["a0a0a0a0a0a0a0a0"]["state"], board["a0a0a0a0a0a0a0a0"]["commit"]) == ("completed", "1" * 40)
    assert (board["b1b1b1b1b1b1b1b1"]["state"], board["b1b1b1b1b1b1b1b1"]["reason"]) == (
        "failed", "the agent exited with code 3")
    assert [gap["recovered"] for gap in board["b1b1b1b1b1b1b1b1"]["gaps"]] == [True, False]
    assert board["c2c2c2c2c2c2c2c2"]["state"] == "cancelled"
    assert (board["d3d3d3d3d3d3d3d3"]["state"], board["d3d3d3d3d3d3d3d3"]["cost_eur"]) == ("completed", 0.03)
    assert replayed == expected


def test_every_event_type_at_a_later_version_has_its_upcasters():
    assert UPCASTERS.missing({name: cls.schema_version for name, cls in EVENT_TYPES.items()}) == []
