"""The flow monitor watches every turn of a conversation (follow-ups) with the same deadlines:
a lingering session's turn from its TurnRequested, a re-provisioned one through its workspace."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from eventsourcing.persistence import Tracking

from events import DEADLINES, Envelope, parse_deadlines
from services.monitor.handlers import Monitor
from tests.unit.fakes import envelopes_in, popo_store

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
TASK = "t1"
_seq = itertools.count(1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def monitor(stall_after_s: float = 300) -> Monitor:
    return Monitor(popo_store(), parse_deadlines("PromptDelivered=30", DEADLINES), stall_after_s=stall_after_s)


async def observe(m: Monitor, event_type: str, seconds: float, **data) -> None:
    envelope = Envelope(type=event_type, task_id=TASK, actor="test", occurred_at=at(seconds), data=data)
    await m.on_event(envelope, Tracking(f"monitor-{event_type}", next(_seq)))


def named(m: Monitor) -> list[tuple[str, dict]]:
    return [(e.type, e.data) for e in envelopes_in(m.store)]


async def first_turn_completed(m: Monitor) -> None:
    """Turn 1, every handoff on time (0 … 8 s)."""
    for i, step in enumerate(("TaskSubmitted", "WorkspaceRequested", "WorkspaceReady",
                              "AgentSessionStarted", "PromptDelivered", "AgentOutput",
                              "AgentFinished", "BranchPushed", "TaskCompleted")):
        await observe(m, step, i, seq=1)


async def turn_requested(m: Monitor, seconds: float, turn: int = 2, reprovision: bool = False) -> None:
    await observe(m, "TurnRequested", seconds, turn=turn, follow_up_id=f"f{turn}", reprovision=reprovision,
                  attempt=2 if reprovision else 1)


async def test_a_follow_ups_prompt_never_delivered_is_named_with_its_turn_within_the_deadline():
    m = monitor()
    await first_turn_completed(m)
    await turn_requested(m, 100)

    m.tick(at(129))
    assert named(m) == []
    m.tick(at(131))
    m.tick(at(140))

    assert named(m) == [("StepOverdue", {"expected": "PromptDelivered", "after": "TurnRequested",
                                         "waited_s": 31.0, "turn": 2})]


async def test_a_follow_ups_turn_that_completes_on_time_names_no_gap_and_ends_the_watch_again():
    m = monitor()
    await first_turn_completed(m)
    await turn_requested(m, 100)
    for i, step in enumerate(("PromptDelivered", "AgentOutput", "AgentFinished", "BranchPushed", "TaskCompleted")):
        await observe(m, step, 101 + i, turn=2, seq=2)
    m.tick(at(1000))
    assert named(m) == [] and TASK not in m.watches


async def test_a_follow_ups_missing_push_is_named_with_its_turn():
    m = monitor()
    await first_turn_completed(m)
    await turn_requested(m, 100)
    await observe(m, "PromptDelivered", 101, turn=2)
    await observe(m, "AgentOutput", 102, seq=2)
    await observe(m, "AgentFinished", 103, stop_reason="end_turn")

    m.tick(at(103 + 59))
    assert named(m) == []
    m.tick(at(103 + 61))
    assert named(m) == [("StepOverdue", {"expected": "BranchPushed", "after": "AgentFinished",
                                         "waited_s": 61.0, "turn": 2})]


async def test_a_turn_that_skips_its_output_is_named_at_once_with_its_turn():
    m = monitor()
    await first_turn_completed(m)
    await turn_requested(m, 100)
    await observe(m, "PromptDelivered", 101, turn=2)
    await observe(m, "AgentFinished", 102, stop_reason="end_turn")
    assert [(t, d["expected"], d["turn"]) for t, d in named(m)] == [("StepOverdue", "AgentOutput", 2)]


async def test_an_earlier_turns_late_events_are_no_gap_of_the_later_turn_and_do_not_end_it():
    m = monitor()
    await first_turn_completed(m)
    await turn_requested(m, 100)
    # Turn 1's push and completion reach the monitor after turn 2 began (each type has its consumer).
    await observe(m, "BranchPushed", 7, branch="b", commit="c")
    await observe(m, "TaskCompleted", 8, branch="b", commit="c")
    assert TASK in m.watches
    # Turn 2's AgentFinished came before its output: named, so turn 1's output did not stand in for it.
    await observe(m, "PromptDelivered", 101, turn=2)
    await observe(m, "AgentFinished", 102, stop_reason="end_turn")
    assert [d["expected"] for _, d in named(m)] == ["AgentOutput"]


async def test_a_turns_handoffs_folded_before_its_request_are_its_own():
    m = monitor()
    await first_turn_completed(m)
    # The vm_agent's PromptDelivered and output of turn 2 are folded before the task runner's TurnRequested.
    await observe(m, "PromptDelivered", 101, turn=2)
    await observe(m, "AgentOutput", 102, seq=2)
    await turn_requested(m, 100.5)
    await observe(m, "AgentFinished", 103, stop_reason="end_turn")
    await observe(m, "BranchPushed", 104, branch="b", commit="c2")
    await observe(m, "TaskCompleted", 105, turn=2, branch="b", commit="c2")
    m.tick(at(1000))
    assert named(m) == [] and TASK not in m.watches


async def test_a_reprovisioned_turn_is_watched_through_its_new_workspace():
    m = monitor()
    await first_turn_completed(m)
    await turn_requested(m, 400, reprovision=True)
    await observe(m, "WorkspaceRequested", 400.1, attempt=2, repo="r", agent="shell")

    m.tick(at(400.1 + 119))
    assert named(m) == []
    m.tick(at(400.1 + 121))
    assert named(m) == [("StepOverdue", {"expected": "WorkspaceReady", "after": "WorkspaceRequested",
                                         "waited_s": 121.0, "turn": 2})]


async def test_a_reprovisioned_turns_workspace_request_folded_before_its_turn_request_is_its_own():
    m = monitor()
    await first_turn_completed(m)
    await observe(m, "WorkspaceRequested", 400.1, attempt=2, repo="r", agent="shell")
    await turn_requested(m, 400, reprovision=True)
    for i, step in enumerate(("WorkspaceReady", "AgentSessionStarted")):
        await observe(m, step, 401 + i)
    # The new session never gets the follow-up's prompt: named after the workspace was ready.
    m.tick(at(401 + 31))
    assert named(m) == [("StepOverdue", {"expected": "PromptDelivered", "after": "WorkspaceReady",
                                         "waited_s": 31.0, "turn": 2})]


async def test_a_reprovisioned_turn_whose_workspace_is_never_requested_is_named():
    m = monitor()
    await first_turn_completed(m)
    await turn_requested(m, 400, reprovision=True)
    m.tick(at(400 + 31))
    assert [(d["expected"], d["after"], d["turn"]) for _, d in named(m)] == [
        ("WorkspaceRequested", "TurnRequested", 2)]


async def test_an_agent_silent_in_a_later_turn_is_stalled_with_its_turn_and_not_before():
    m = monitor(stall_after_s=10)
    await first_turn_completed(m)
    await turn_requested(m, 100)
    await observe(m, "PromptDelivered", 101, turn=2)
    # Turn 1's last output was long ago: the silence counts from turn 2's prompt.
    m.tick(at(105))
    assert named(m) == []
    m.tick(at(112))
    assert named(m) == [("AgentStalled", {"silent_s": 11.0, "last_seq": 1, "turn": 2})]


async def test_a_later_turn_waiting_for_a_person_is_not_stalled_nor_overdue():
    m = monitor(stall_after_s=10)
    await first_turn_completed(m)
    await turn_requested(m, 100)
    await observe(m, "PromptDelivered", 101, turn=2)
    await observe(m, "AgentOutput", 102, seq=2)
    await observe(m, "PermissionRequested", 103, request_id="p1")
    m.tick(at(500))
    assert named(m) == [] and m.waiting_for_person(TASK)


async def test_a_restarted_monitor_keeps_watching_a_later_turn():
    m = monitor()
    await first_turn_completed(m)
    await turn_requested(m, 100)

    again = Monitor(m.store, m.deadlines, stall_after_s=300)
    again.resume()
    again.tick(at(131))

    assert [(t, d["turn"]) for t, d in named(again)] == [("StepOverdue", 2)]


async def test_a_late_prompt_of_a_later_turn_recovers_with_its_turn():
    m = monitor()
    await first_turn_completed(m)
    await turn_requested(m, 100)
    m.tick(at(131))
    await observe(m, "PromptDelivered", 140, turn=2)
    assert named(m)[-1] == ("StepRecovered", {"expected": "PromptDelivered", "after": "TurnRequested",
                                              "waited_s": 40.0, "turn": 2})


async def test_a_turn_whose_prompt_is_older_than_its_recorded_request_owns_its_handoffs():
    m = monitor()
    await first_turn_completed(m)
    # The task runner records TurnRequested after the vm_agent took the turn: the agent was quicker.
    await turn_requested(m, 101)
    await observe(m, "AgentOutput", 100.7, seq=2)
    await observe(m, "AgentFinished", 100.8, stop_reason="end_turn")
    await observe(m, "PromptDelivered", 100.5, turn=2)
    await observe(m, "BranchPushed", 102, branch="b", commit="c2")
    await observe(m, "TaskCompleted", 103, turn=2, branch="b", commit="c2")
    m.tick(at(1000))
    assert named(m) == [] and TASK not in m.watches
