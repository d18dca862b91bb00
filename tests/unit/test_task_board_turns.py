"""The task board and follow-ups: a completed task whose next turn was delivered runs again, in
whichever order its consumers fold the turn's events."""

from __future__ import annotations

from tests.unit.test_task_board import SUBMITTED_DATA, board, feed  # noqa: F401 (fixtures)


def test_a_follow_ups_turn_runs_the_completed_task_again_until_that_turn_completes(board, feed):  # noqa: F811
    feed("TaskSubmitted", **SUBMITTED_DATA)
    feed("PromptDelivered", session_id="s", prompt_sha256="h1")
    feed("TaskCompleted", branch="baton/t1", commit="c1")
    assert board.get("t1")["state"] == "completed"
    feed("PromptDelivered", session_id="s", prompt_sha256="h2", turn=2)
    assert board.get("t1")["state"] == "running"
    feed("TaskCompleted", branch="baton/t1", commit="c2", turn=2)
    row = board.get("t1")
    assert (row["state"], row["commit"]) == ("completed", "c2")


def test_a_turns_delivery_folded_before_the_turn_befores_completion_still_shows_it_running(board, feed):  # noqa: F811
    feed("TaskSubmitted", **SUBMITTED_DATA)
    feed("PromptDelivered", session_id="s", prompt_sha256="h1")
    feed("PromptDelivered", session_id="s", prompt_sha256="h2", turn=2)
    feed("TaskCompleted", branch="baton/t1", commit="c1")
    assert board.get("t1")["state"] == "running"
    feed("TaskCompleted", branch="baton/t1", commit="c2", turn=2)
    assert board.get("t1")["state"] == "completed"
