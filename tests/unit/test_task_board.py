"""The task board projection (SQLite in tmp_path)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from eventsourcing.persistence import Tracking

from events import Envelope
from projections.sql import SQLiteDatabase
from projections.task_board import TaskBoard

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
SUBMITTED_DATA = {"repo": "file:///r", "agent": "shell", "prompt": "p", "base_branch": None}


@pytest.fixture
def board(tmp_path):
    board = TaskBoard(SQLiteDatabase(tmp_path / "proj" / "board.sqlite"))
    yield board
    board.close()


class Feed:
    """Applies events to the board with a fresh tracking position per event."""

    def __init__(self, board: TaskBoard) -> None:
        self.board = board
        self.seq = 0

    def __call__(self, type_: str, task_id: str = "t1", minutes: int = 0, **data) -> Tracking:
        self.seq += 1
        tracking = Tracking(f"projector-{type_}", self.seq)
        envelope = Envelope(type=type_, task_id=task_id, actor="x", data=data,
                            occurred_at=T0 + timedelta(minutes=minutes or self.seq))
        self.board.apply(envelope, tracking)
        return tracking


@pytest.fixture
def feed(board):
    return Feed(board)


def test_a_row_follows_the_lifecycle_from_queued_to_completed(board, feed):
    feed("TaskSubmitted", **SUBMITTED_DATA)
    assert board.get("t1")["state"] == "queued"
    feed("WorkspaceRequested", repo="file:///r", agent="shell")
    assert board.get("t1")["state"] == "provisioning"
    feed("WorkspaceReady", workspace_id="w", provider="local", vm_agent_url="http://vm")
    assert board.get("t1")["state"] == "provisioning"
    feed("AgentSessionStarted", session_id="s", agent="shell", attempt_id="t1-a1")
    assert board.get("t1")["state"] == "running"
    feed("TaskCompleted", branch="baton/t1", commit="abc")
    row = board.get("t1")
    assert row["state"] == "completed"
    assert (row["branch"], row["commit"], row["reason"]) == ("baton/t1", "abc", None)
    assert (row["repo"], row["agent"], row["prompt"]) == ("file:///r", "shell", "p")
    assert row["last_event"] == "TaskCompleted"
    assert row["created_at"] == (T0 + timedelta(minutes=1)).isoformat()
    assert "commit_sha" not in row


def test_an_event_arriving_out_of_order_never_moves_the_state_back(board, feed):
    feed("TaskSubmitted", **SUBMITTED_DATA)
    feed("TaskCompleted", branch="baton/t1", commit="abc")
    feed("WorkspaceReady", workspace_id="w", provider="local", vm_agent_url="http://vm")
    feed("AgentSessionStarted", session_id="s", agent="shell", attempt_id="t1-a1")
    row = board.get("t1")
    assert row["state"] == "completed"
    assert row["branch"] == "baton/t1"


def test_the_first_event_seen_sets_the_state_even_when_it_is_late_in_the_lifecycle(board, feed):
    feed("AgentSessionStarted", session_id="s", agent="shell", attempt_id="a")
    assert board.get("t1")["state"] == "running"
    feed("TaskSubmitted", **SUBMITTED_DATA)
    row = board.get("t1")
    assert row["state"] == "running"
    assert row["repo"] == "file:///r"


def test_a_failed_task_keeps_its_reason_and_its_failed_state(board, feed):
    feed("TaskSubmitted", **SUBMITTED_DATA)
    feed("TaskFailed", reason="workspace failed: clone failed")
    feed("SessionFailed", reason="late")
    feed("AgentFinished", stop_reason="cancelled", exit_code=1)
    row = board.get("t1")
    assert row["state"] == "failed"
    assert row["reason"] == "workspace failed: clone failed"


def test_tracking_marks_an_applied_position_and_everything_before_it_as_processed(board, feed):
    feed("TaskSubmitted", **SUBMITTED_DATA)
    tracking = feed("WorkspaceRequested", repo="r", agent="shell")
    assert board.is_processed(tracking)
    assert board.is_processed(Tracking(tracking.application_name, tracking.notification_id - 1))
    assert not board.is_processed(Tracking(tracking.application_name, tracking.notification_id + 1))
    assert not board.is_processed(Tracking("projector-TaskFailed", 1))


def test_reapplying_a_processed_message_the_way_the_consumer_does_is_a_no_op(board, feed):
    feed("TaskSubmitted", **SUBMITTED_DATA)
    envelope = Envelope(type="TaskFailed", task_id="t1", actor="x", data={"reason": "first"},
                        occurred_at=T0 + timedelta(hours=1))
    tracking = Tracking("projector-TaskFailed", 7)
    board.apply(envelope, tracking)
    before = board.get("t1")
    replay = envelope.model_copy(update={"data": {"reason": "second"}})
    if not board.is_processed(tracking):
        board.apply(replay, tracking)
    assert board.get("t1") == before
    assert before["reason"] == "first"


def test_save_processed_records_a_position_without_touching_any_row(board):
    board.save_processed(Tracking("projector-TaskSubmitted", 3))
    assert board.is_processed(Tracking("projector-TaskSubmitted", 3))
    assert board.list() == []


def test_list_orders_tasks_newest_first_and_respects_its_limit(board, feed):
    feed("TaskSubmitted", task_id="old", minutes=1, **SUBMITTED_DATA)
    feed("TaskSubmitted", task_id="new", minutes=30, **SUBMITTED_DATA)
    feed("TaskSubmitted", task_id="mid", minutes=10, **SUBMITTED_DATA)
    feed("TaskCompleted", task_id="old", minutes=60, branch="b", commit="c")
    assert [row["task_id"] for row in board.list()] == ["new", "mid", "old"]
    assert [row["task_id"] for row in board.list(limit=2)] == ["new", "mid"]


def test_an_unknown_task_is_none_and_a_reopened_board_keeps_its_rows(tmp_path):
    path = tmp_path / "b.sqlite"
    first = TaskBoard(SQLiteDatabase(path))
    assert first.get("nope") is None
    Feed(first)("TaskSubmitted", **SUBMITTED_DATA)
    first.close()
    second = TaskBoard(SQLiteDatabase(path))
    try:
        assert second.get("t1")["state"] == "queued"
    finally:
        second.close()


def test_waiting_tasks_show_their_place_in_the_line_and_lose_it_when_they_get_a_place(board, feed):
    for task_id in ("a", "b", "c", "d"):
        feed("TaskSubmitted", task_id, **SUBMITTED_DATA)
    feed("WorkspaceRequested", "a", repo="file:///r", agent="shell")
    for position, task_id in enumerate(("b", "c", "d"), start=1):
        feed("TaskQueued", task_id, position=position, max_running=1)
    assert [board.get(t)["queue_position"] for t in "abcd"] == [None, 1, 2, 3]
    # a ends, b gets its place: everyone behind moves up one.
    feed("TaskCompleted", "a", branch="baton/a", commit="c" * 40)
    feed("WorkspaceRequested", "b", repo="file:///r", agent="shell")
    assert {row["task_id"]: row["queue_position"] for row in board.list()} == {
        "a": None, "b": None, "c": 1, "d": 2}
    assert board.get("c")["state"] == "queued"


def test_a_start_projected_before_its_queueing_never_puts_the_task_back_in_line(board, feed):
    feed("TaskSubmitted", "a", **SUBMITTED_DATA)
    feed("WorkspaceRequested", "a", repo="file:///r", agent="shell")
    feed("TaskQueued", "a", position=1, max_running=1)
    assert board.get("a")["state"] == "provisioning"
    assert board.get("a")["queue_position"] is None


def test_a_task_costs_what_its_cloud_servers_cost_and_a_redelivered_deletion_counts_once(board, feed):
    feed("TaskSubmitted", **SUBMITTED_DATA)
    feed("TaskCompleted", branch="baton/t1", commit="abc")
    assert board.get("t1")["cost_eur"] is None  # it ran on no server
    for server_id, cost in ((7, 0.0021), (7, 0.0021), (9, 0.0005)):  # attempt 2 ran on server 9
        feed("ServerDeleted", provider="hetzner", server_id=server_id, reason="released", seconds=60.0,
             cost_eur=cost)
    row = board.get("t1")
    assert row["cost_eur"] == pytest.approx(0.0026)
    # The deletion is beside the row: it neither moves the task's state nor its last activity.
    assert (row["state"], row["last_event"]) == ("completed", "TaskCompleted")
    assert [t["cost_eur"] for t in board.list()] == [pytest.approx(0.0026)]


def test_count_by_state_counts_each_tasks_current_state(board, feed):
    feed("TaskSubmitted", task_id="a", **SUBMITTED_DATA)
    feed("TaskSubmitted", task_id="b", **SUBMITTED_DATA)
    feed("TaskCompleted", task_id="b", branch="baton/b", commit="c")
    assert board.count_by_state() == {"queued": 1, "completed": 1}
