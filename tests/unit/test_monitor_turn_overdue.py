"""The task runner acts on the monitor's gap of a follow-up's turn as on the first turn's: it waits
for that turn's handoff (an earlier turn's does not count), then fails the task naming it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from events import BranchPushed, Envelope, FollowUpSubmitted, StepOverdue, envelope_for
from tests.unit.test_task_runner_handlers import TASK, Runner, event, started_runner

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def on_stream(runner: Runner, event_type: str, seconds: float, **data) -> None:
    """`event_type` is the task's latest of its type on the stream, `seconds` after T0."""
    runner.lookup.last[(TASK, event_type)] = Envelope(
        type=event_type, task_id=TASK, actor="test", occurred_at=T0 + timedelta(seconds=seconds), data=data)


async def runner_in_turn_2() -> Runner:
    """Turn 1 pushed and completed at once; a follow-up then runs as turn 2."""
    runner = await started_runner()
    runner.use(overdue_backoff_s=(0,))
    await runner.deliver(envelope_for(FollowUpSubmitted(prompt="echo two"), task_id=TASK, actor="user"))
    await runner.deliver(event(BranchPushed(branch=f"baton/{TASK}", commit="c1")))
    assert runner.task().turn == 2 and not runner.task().is_over
    for step, seconds in (("PromptDelivered", 1), ("AgentOutput", 2), ("AgentFinished", 3), ("BranchPushed", 4)):
        on_stream(runner, step, seconds)  # Turn 1's handoffs.
    on_stream(runner, "TurnRequested", 10, turn=2, follow_up_id="f", reprovision=False, attempt=1)
    return runner


async def overdue(runner: Runner, **named) -> None:
    """The monitor names a step overdue; the task runner's loop then works its check (due at once)."""
    await runner.deliver(event(StepOverdue(**named)))
    await runner.pass_time()


def failure(runner: Runner) -> str | None:
    return next((e.data["reason"] for e in runner.emitted() if e.type == "TaskFailed"), None)


async def test_a_follow_ups_prompt_never_delivered_fails_the_task_naming_it_and_its_turn():
    runner = await runner_in_turn_2()
    # Turn 1's PromptDelivered is on the stream: it does not stand in for turn 2's.
    await overdue(runner, expected="PromptDelivered", after="TurnRequested", waited_s=30, turn=2)
    assert failure(runner) == "PromptDelivered missing 30s after TurnRequested in turn 2"


async def test_a_follow_ups_push_never_made_fails_the_task_naming_it_and_its_turn():
    runner = await runner_in_turn_2()
    on_stream(runner, "PromptDelivered", 11, turn=2)
    on_stream(runner, "AgentFinished", 12)
    await overdue(runner, expected="BranchPushed", after="AgentFinished", waited_s=60, turn=2)
    assert failure(runner) == "BranchPushed missing 60s after AgentFinished in turn 2"


async def test_a_follow_ups_push_that_came_while_waiting_does_not_fail_the_task():
    runner = await runner_in_turn_2()
    on_stream(runner, "PromptDelivered", 11, turn=2)
    on_stream(runner, "BranchPushed", 13, branch=f"baton/{TASK}", commit="c2")
    await overdue(runner, expected="BranchPushed", after="AgentFinished", waited_s=60, turn=2)
    assert failure(runner) is None


async def test_an_earlier_turns_gap_named_late_does_not_fail_the_later_turn():
    runner = await runner_in_turn_2()
    await overdue(runner, expected="AgentOutput", after="PromptDelivered", waited_s=120)
    assert failure(runner) is None
