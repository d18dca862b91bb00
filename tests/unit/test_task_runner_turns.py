"""The task runner's turn decisions: follow-ups are kept in order and each handed over once, when
the agent is idle (the turn before pushed and the task completed)."""

from __future__ import annotations

import pytest
from eventsourcing.persistence import Tracking

from events import BranchPushed, FollowUpSubmitted, TaskCancelRequested, envelope_for
from services.task_runner.vm_agent_client import VmAgentSilent
from tests.unit.fakes import FakeStarter
from tests.unit.test_task_runner_handlers import TASK, Runner, started_runner


def follow_up(prompt: str):
    return envelope_for(FollowUpSubmitted(prompt=prompt), task_id=TASK, actor="user")


def pushed(commit: str):
    return envelope_for(BranchPushed(branch=f"baton/{TASK}", commit=commit), task_id=TASK, actor="vm_agent")


def turns_started(runner: Runner) -> list[tuple[int, str]]:
    return [(c["turn"], c["prompt"]) for c in runner.starter.calls if "turn_at" in c]


def completed_turns(runner: Runner) -> list[tuple[int, str]]:
    return [(e.data.get("turn", 1), e.data["commit"]) for e in runner.emitted() if e.type == "TaskCompleted"]


async def test_follow_ups_sent_during_a_turn_wait_for_its_push_then_run_one_at_a_time_in_order():
    runner = await started_runner()
    first, second = follow_up("echo two"), follow_up("echo three")
    await runner.deliver(first)
    await runner.deliver(second)
    assert turns_started(runner) == []  # The first turn still runs.

    await runner.deliver(pushed("c1"))
    # The task completed turn 1 and handed over the oldest follow-up as turn 2, caused by it.
    assert completed_turns(runner) == [(1, "c1")]
    assert turns_started(runner) == [(2, "echo two")]
    [call] = [c for c in runner.starter.calls if "turn_at" in c]
    assert call["causation_id"] == first.event_id and call["attempt_id"] == f"{TASK}-a1"
    assert runner.task().state == "starting" and not runner.task().is_over

    # The agent runs turn 2 on its session (its own PromptDelivered, output, end) and pushes.
    await runner.agent_runs_turn()
    await runner.deliver(pushed("c2"))
    assert completed_turns(runner) == [(1, "c1"), (2, "c2")]
    assert turns_started(runner) == [(2, "echo two"), (3, "echo three")]
    await runner.agent_runs_turn()
    await runner.deliver(pushed("c3"))
    assert completed_turns(runner) == [(1, "c1"), (2, "c2"), (3, "c3")]
    assert runner.task().state == "completed" and runner.task().follow_ups == []


async def test_a_follow_up_to_a_completed_task_runs_at_once_and_a_redelivered_one_runs_once():
    runner = await started_runner()
    await runner.deliver(pushed("c1"))
    message = follow_up("echo again")
    tracking = await runner.deliver(message)
    assert turns_started(runner) == [(2, "echo again")]
    assert runner.task().state == "starting"
    # The same message again (a redelivery, or the same event under another position) starts nothing.
    await runner.deliver(message, tracking)
    await runner.deliver(message)
    assert turns_started(runner) == [(2, "echo again")]


async def test_a_vm_agent_that_cannot_take_the_turn_means_the_turn_re_provisions_a_workspace():
    starter = FakeStarter()
    starter.refuse_turns_with = "vm_agent at http://vm:1 unreachable"
    runner = await started_runner(starter)
    await runner.deliver(follow_up("echo two"))
    await runner.deliver(follow_up("echo three"))
    await runner.deliver(pushed("c1"))
    # The lingering vm_agent was asked first; it is gone, so turn 2 gets a new workspace (attempt 2).
    assert turns_started(runner) == [(2, "echo two")]
    [requested] = [e for e in runner.emitted() if e.type == "TurnRequested"]
    assert (requested.data["turn"], requested.data["reprovision"], requested.data["attempt"]) == (2, True, 2)
    assert runner.task().state == "provisioning" and [p for _, p in runner.task().follow_ups] == ["echo three"]
    assert completed_turns(runner) == [(1, "c1")]


async def test_a_task_asked_to_cancel_takes_no_follow_up():
    runner = await started_runner()
    await runner.deliver(envelope_for(TaskCancelRequested(by="user"), task_id=TASK, actor="user"))
    await runner.deliver(follow_up("echo two"))
    assert runner.task().follow_ups == [] and turns_started(runner) == []


async def test_a_follow_up_before_its_task_is_known_is_retried_not_lost():
    runner = Runner()
    with pytest.raises(LookupError):
        await runner.deliver(follow_up("echo two"))


async def test_an_overdue_prompt_of_a_turn_on_the_lingering_session_is_retried_as_that_turn():
    from events import StepOverdue

    runner = await started_runner()
    runner.use(overdue_backoff_s=(0, 0))
    await runner.deliver(pushed("c1"))
    await runner.deliver(follow_up("echo two"))
    calls_before = len(runner.starter.calls)

    overdue = StepOverdue(expected="PromptDelivered", after="TurnRequested", waited_s=30.0, turn=2)
    await runner.deliver(envelope_for(overdue, task_id=TASK, actor="service:monitor"))
    await runner.pass_time()  # The loop's checks, both due at once.

    # The vm_agent is asked again for turn 2 of its session (idempotent by turn), never to start a session.
    retries = runner.starter.calls[calls_before:]
    assert [(c.get("turn_at") is not None, c["turn"], c["prompt"]) for c in retries] == [(True, 2, "echo two")] * 2
    assert runner.emitted()[-1].data["reason"] == "PromptDelivered missing 30s after TurnRequested in turn 2"


async def in_turn_2() -> Runner:
    """Turn 1 ran and pushed; a follow-up was handed to the lingering vm_agent as turn 2."""
    runner = await started_runner()
    await runner.deliver(pushed("c1"))
    await runner.deliver(follow_up("echo two"))
    assert turns_started(runner) == [(2, "echo two")]
    return runner


def failure(runner: Runner) -> str | None:
    return next((e.data["reason"] for e in runner.emitted() if e.type == "TaskFailed"), None)


async def test_a_turn_2_push_without_its_own_prompt_delivery_fails_the_task_naming_the_handoff_and_turn():
    runner = await in_turn_2()
    # Turn 1's PromptDelivered, AgentOutput and AgentFinished are on the stream; turn 2 shows none.
    await runner.deliver(pushed("c2"))
    assert failure(runner) == "PromptDelivered missing in turn 2: the flow reached BranchPushed without it"
    assert completed_turns(runner) == [(1, "c1")] and runner.task().state == "failed"


async def test_a_turn_2_push_without_its_own_agent_output_fails_though_turn_1_had_output():
    runner = await in_turn_2()
    await runner.agent_runs_turn(output=False)
    await runner.deliver(pushed("c2"))
    assert failure(runner) == "AgentOutput missing in turn 2: the flow reached BranchPushed without it"


async def test_turn_2_s_prompt_delivered_on_the_stream_before_its_turn_requested_still_completes_it():
    # The vm_agent may publish the turn's handoffs before the task runner's TurnRequested is relayed.
    runner = await in_turn_2()
    del runner.lookup.last[(TASK, "TurnRequested")]
    await runner.agent_runs_turn()
    await runner.deliver(pushed("c2"))
    assert completed_turns(runner) == [(1, "c1"), (2, "c2")]


async def test_a_lingering_vm_agent_that_does_not_answer_leaves_the_follow_up_to_be_asked_again_as_the_same_turn():
    runner = await started_runner()
    await runner.deliver(pushed("c1"))
    runner.starter.silent_on_turns = True
    message, tracking = follow_up("echo two"), Tracking("task-runner-FollowUpSubmitted", 100)

    # It may have taken the turn: nothing is decided (no re-provision), the event is handled again later.
    with pytest.raises(VmAgentSilent):
        await runner.deliver(message, tracking)
    assert not runner.store.is_processed(tracking)
    assert [e.type for e in runner.emitted()].count("TurnRequested") == 0
    assert [e.type for e in runner.emitted()].count("WorkspaceRequested") == 1
    assert runner.task().state == "completed" and runner.task().follow_ups == []

    # The redelivery asks again for the same turn (the vm_agent starts nothing twice) and records it once.
    runner.starter.silent_on_turns = False
    await runner.deliver(message, tracking)
    assert turns_started(runner) == [(2, "echo two"), (2, "echo two")]
    [requested] = [e for e in runner.emitted() if e.type == "TurnRequested"]
    assert (requested.data["turn"], requested.data["reprovision"]) == (2, False)
    assert runner.task().state == "starting"


async def test_a_silent_vm_agent_at_a_turns_push_leaves_the_push_to_be_handled_again_completing_it_once():
    runner = await started_runner()
    await runner.deliver(follow_up("echo two"))  # Waits for turn 1's push.
    runner.starter.silent_on_turns = True
    push, tracking = pushed("c1"), Tracking("task-runner-BranchPushed", 100)
    with pytest.raises(VmAgentSilent):
        await runner.deliver(push, tracking)
    assert completed_turns(runner) == [] and not runner.store.is_processed(tracking)

    runner.starter.silent_on_turns = False
    await runner.deliver(push, tracking)
    assert completed_turns(runner) == [(1, "c1")]
    assert turns_started(runner) == [(2, "echo two"), (2, "echo two")]
    assert [e.type for e in runner.emitted()].count("TurnRequested") == 1
