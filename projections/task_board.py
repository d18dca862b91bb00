"""The task board: one row per task with its state, written with its consumer position in one transaction."""

from __future__ import annotations

import json
from typing import Any

from eventsourcing.persistence import Tracking

from events import Envelope, parse_event
from projections.sql import TrackedProjection

# The board's state for each lifecycle event. A task only moves forward through
# STATE_RANK, so events that reach the projector out of order never move it back.
STATE_OF = {
    "TaskSubmitted": "queued",
    "TaskQueued": "queued",
    "WorkspaceRequested": "provisioning",
    "WorkspaceReady": "provisioning",
    "WorkspaceFailed": "provisioning",
    "AgentSessionStarted": "running",
    "PromptDelivered": "running",
    "AgentFinished": "running",
    "SessionFailed": "running",
    "BranchPushed": "running",
    "TaskCompleted": "completed",
    "TaskFailed": "failed",
    "TaskCancelled": "cancelled",
}
GAP_TYPES = ("StepOverdue", "StepRecovered", "AgentStalled")
PERMISSION_TYPES = ("PermissionRequested", "PermissionAnswered")
COST_TYPES = ("ServerDeleted",)
PROJECTED_TYPES = (*STATE_OF, *GAP_TYPES, *PERMISSION_TYPES, *COST_TYPES)
"""Every event type the board folds in (AgentOutput is not one: the board has no use for it)."""

STATE_RANK = {"queued": 0, "provisioning": 1, "running": 2, "completed": 3, "failed": 4, "cancelled": 4}
"""A task that completed a turn may still fail or be cancelled in a later one (a follow-up's)."""
STATES = tuple(STATE_RANK)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    repo TEXT, agent TEXT, prompt TEXT, base_branch TEXT,
    branch TEXT, commit_sha TEXT, reason TEXT,
    created_at TEXT, updated_at TEXT, last_event TEXT, gaps TEXT
);
CREATE INDEX IF NOT EXISTS tasks_by_created ON tasks (created_at);
CREATE TABLE IF NOT EXISTS task_queue (task_id TEXT PRIMARY KEY, queued_seq BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS task_permissions (
    task_id TEXT NOT NULL, request_id TEXT NOT NULL, answered INTEGER NOT NULL,
    PRIMARY KEY (task_id, request_id)
);
CREATE TABLE IF NOT EXISTS task_asking (task_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS task_turns (
    task_id TEXT PRIMARY KEY, delivered INTEGER NOT NULL, completed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS task_servers (
    task_id TEXT NOT NULL, server_id BIGINT NOT NULL, seconds DOUBLE PRECISION NOT NULL,
    cost_eur DOUBLE PRECISION, PRIMARY KEY (task_id, server_id)
)
"""
# task_turns: the last turn whose prompt was delivered and the last that completed. A follow-up
# runs after the task completed: the board says `running` until its turn completes too.
# task_permissions: each permission request and whether it was answered yet (its answer may be
# folded first: each event type has its own consumer). A task with an open one waits for a person.
# task_asking: the tasks submitted with the `ask` permission policy (the rest are `auto`).
# task_servers: each cloud server a task ran on (its ServerDeleted): life and cost; the task's
# cost is their sum.
# task_queue: the stream position of each task's TaskQueued. The tasks still `queued` with one,
# in that order, are the line the task runner serves (it queues and starts in that order).

_COLUMNS = ("task_id", "state", "repo", "agent", "prompt", "base_branch", "branch",
            "commit_sha", "reason", "created_at", "updated_at", "last_event", "gaps")
_UPSERT = (
    f"INSERT INTO tasks ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)}) "
    "ON CONFLICT (task_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:])
)


def _gaps_after(envelope: Envelope, gaps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The task's gaps once `envelope` (StepOverdue, StepRecovered, AgentStalled) is folded in."""
    data = envelope.data
    if envelope.type == "StepOverdue":
        return [*gaps, {"expected": data["expected"], "after": data["after"],
                        "waited_s": data["waited_s"], "recovered": False, "turn": data.get("turn", 1),
                        "at": envelope.occurred_at.isoformat()}]
    if envelope.type == "AgentStalled":
        return [*gaps, {"expected": "AgentOutput", "after": "AgentOutput", "waited_s": data["silent_s"],
                        "recovered": False, "stalled": True, "turn": data.get("turn", 1),
                        "at": envelope.occurred_at.isoformat()}]
    for gap in reversed(gaps):  # StepRecovered closes the latest open gap it names (in its turn).
        if (gap["expected"] == data["expected"] and not gap["recovered"]
                and gap.get("turn", 1) == data.get("turn", 1)):
            gap.update(recovered=True, recovered_after_s=data["waited_s"])
            break
    return gaps


def _fields_from(envelope: Envelope) -> dict[str, Any]:
    data = envelope.data
    if envelope.type == "TaskSubmitted":
        return {k: data.get(k) for k in ("repo", "agent", "prompt", "base_branch")} | {
            "created_at": envelope.occurred_at.isoformat()
        }
    if envelope.type in ("BranchPushed", "TaskCompleted"):
        return {"branch": data["branch"], "commit_sha": data["commit"]}
    if envelope.type in ("TaskFailed",):
        return {"reason": data["reason"]}
    if envelope.type == "TaskCancelled":
        return {"reason": f"cancelled by {data['by']}" + (f": {data['reason']}" if data.get("reason") else "")}
    return {}


class TaskBoard(TrackedProjection):
    """Writer (the projector) and reader (the gateway) of the task-board table."""

    SCHEMA = _SCHEMA

    def apply(self, envelope: Envelope, tracking: Tracking) -> None:
        """Fold one event into its task's row and move the consumer position, atomically."""
        self.apply_batch([(envelope, tracking)])

    def apply_batch(self, items: list[tuple[Envelope, Tracking]]) -> None:
        """Fold events in stream order into their tasks' rows, with the last position, in one
        transaction. An event that breaks the contract raises (and is dead-lettered): the board
        shows only what the contract allows."""
        for envelope, _ in items:
            parse_event(envelope)
        rows: dict[str, dict[str, Any]] = {}
        with self._db.transaction() as db:
            for envelope, tracking in items:
                if envelope.type in COST_TYPES:  # A server's life and cost, beside the task's row.
                    _note_server(db, envelope)
                    continue
                if envelope.task_id not in rows:
                    found = db.execute("SELECT * FROM tasks WHERE task_id = ?", (envelope.task_id,))
                    rows[envelope.task_id] = found[0] if found else {"task_id": envelope.task_id}
                _fold(rows[envelope.task_id], envelope)
                if envelope.type == "TaskQueued":
                    db.execute("INSERT INTO task_queue (task_id, queued_seq) VALUES (?, ?) "
                               "ON CONFLICT (task_id) DO NOTHING", (envelope.task_id, tracking.notification_id))
                if envelope.type in PERMISSION_TYPES:
                    _note_permission(db, envelope)
                if envelope.type in ("PromptDelivered", "TaskCompleted"):
                    _note_turn(db, envelope, rows[envelope.task_id])
                if envelope.type == "TaskSubmitted" and envelope.data.get("permission_policy") == "ask":
                    db.execute("INSERT INTO task_asking (task_id) VALUES (?) ON CONFLICT (task_id) DO NOTHING",
                               (envelope.task_id,))
            for row in rows.values():
                db.execute(_UPSERT, [row.get(column) for column in _COLUMNS])
            self.track(db, items[-1][1])

    def get(self, task_id: str) -> dict[str, Any] | None:
        rows = self._db.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,))
        if not rows:
            return None
        return (_public(rows[0], self.queue_positions()) | self._permissions_of([task_id])[task_id]
                | self._costs_of([task_id])[task_id])

    def list(self, *, limit: int = 500) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT * FROM tasks ORDER BY created_at DESC LIMIT ?", (limit,))
        positions = self.queue_positions()
        task_ids = [row["task_id"] for row in rows]
        permissions, costs = self._permissions_of(task_ids), self._costs_of(task_ids)
        return [_public(row, positions) | permissions[row["task_id"]] | costs[row["task_id"]] for row in rows]

    def count_by_state(self) -> dict[str, int]:
        """How many tasks are in each state (those with none are left out)."""
        rows = self._db.execute("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state")
        return {row["state"]: row["n"] for row in rows}

    def _costs_of(self, task_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Each task's `cost_eur`: what its cloud servers cost (None for a task that ran on none)."""
        costs: dict[str, Any] = dict.fromkeys(task_ids)
        if task_ids:
            marks = ", ".join("?" for _ in task_ids)
            for row in self._db.execute(
                    f"SELECT task_id, SUM(cost_eur) AS cost FROM task_servers WHERE task_id IN ({marks}) "
                    "GROUP BY task_id", task_ids):
                costs[row["task_id"]] = row["cost"]
        return {task_id: {"cost_eur": cost} for task_id, cost in costs.items()}

    def _permissions_of(self, task_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Each task's `permission_policy` and `waiting_for` ("person" while it asks one)."""
        awaiting = self.awaiting_person()
        marks = ", ".join("?" for _ in task_ids)
        asking = {row["task_id"] for row in self._db.execute(
            f"SELECT task_id FROM task_asking WHERE task_id IN ({marks})", task_ids)} if task_ids else set()
        return {task_id: {"permission_policy": "ask" if task_id in asking else "auto",
                          "waiting_for": _waiting_for(task_id, awaiting)} for task_id in task_ids}

    def awaiting_person(self) -> set[str]:
        """The tasks not ended with a permission request a person has not answered yet (a task that
        ended while asking, cancelled or failed, waits for nobody)."""
        rows = self._db.execute(
            "SELECT DISTINCT p.task_id FROM task_permissions p JOIN tasks t ON t.task_id = p.task_id "
            "WHERE p.answered = 0 AND t.state NOT IN ('completed', 'failed', 'cancelled')")
        return {row["task_id"] for row in rows}

    def queue_positions(self) -> dict[str, int]:
        """Each task waiting for a place → its place in the line (1 = next)."""
        rows = self._db.execute(
            "SELECT q.task_id FROM task_queue q JOIN tasks t ON t.task_id = q.task_id "
            "WHERE t.state = 'queued' ORDER BY q.queued_seq")
        return {row["task_id"]: index for index, row in enumerate(rows, start=1)}


def _fold(row: dict[str, Any], envelope: Envelope) -> None:
    """One event into its task's row (a row without a state is new)."""
    row.update(_fields_from(envelope))
    if envelope.type in GAP_TYPES:
        row["gaps"] = json.dumps(_gaps_after(envelope, json.loads(row.get("gaps") or "[]")))
    new_state = STATE_OF.get(envelope.type, row.get("state") or "queued")
    if "state" not in row or STATE_RANK[new_state] > STATE_RANK[row["state"]]:
        row["state"] = new_state
    row["updated_at"] = envelope.occurred_at.isoformat()
    row["last_event"] = envelope.type
    if not row.get("created_at"):
        row["created_at"] = row["updated_at"]


def _note_server(db: Any, envelope: Envelope) -> None:
    db.execute("INSERT INTO task_servers (task_id, server_id, seconds, cost_eur) VALUES (?, ?, ?, ?) "
               "ON CONFLICT (task_id, server_id) DO NOTHING",
               (envelope.task_id, envelope.data["server_id"], envelope.data["seconds"], envelope.data.get("cost_eur")))


def _note_turn(db: Any, envelope: Envelope, row: dict[str, Any]) -> None:
    """A completed task whose later turn was delivered runs again (each event type has its own
    consumer, so a turn's PromptDelivered may be folded before the turn before's TaskCompleted)."""
    turn, column = envelope.data.get("turn", 1), "delivered" if envelope.type == "PromptDelivered" else "completed"
    db.execute("INSERT INTO task_turns (task_id, delivered, completed) VALUES (?, 0, 0) "
               "ON CONFLICT (task_id) DO NOTHING", (envelope.task_id,))
    db.execute(f"UPDATE task_turns SET {column} = ? WHERE task_id = ? AND {column} < ?",
               (turn, envelope.task_id, turn))
    found = db.execute("SELECT delivered, completed FROM task_turns WHERE task_id = ?", (envelope.task_id,))
    if row.get("state") == "completed" and found[0]["delivered"] > found[0]["completed"]:
        row["state"] = "running"


def _note_permission(db: Any, envelope: Envelope) -> None:
    answered = int(envelope.type == "PermissionAnswered")
    db.execute("INSERT INTO task_permissions (task_id, request_id, answered) VALUES (?, ?, ?) "
               "ON CONFLICT (task_id, request_id) DO UPDATE SET answered = "
               "CASE WHEN excluded.answered = 1 THEN 1 ELSE task_permissions.answered END",
               (envelope.task_id, envelope.data["request_id"], answered))


def _waiting_for(task_id: str, awaiting: set[str]) -> str | None:
    """`"person"` while the task's agent waits for a person's answer."""
    return "person" if task_id in awaiting else None


def _public(row: dict[str, Any], positions: dict[str, int]) -> dict[str, Any]:
    task = dict(row)
    task["queue_position"] = positions.get(task["task_id"])
    task["commit"] = task.pop("commit_sha")
    task["gaps"] = json.loads(task.get("gaps") or "[]")
    return task
