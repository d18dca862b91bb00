"""The task runner waits for a late handoff outside its handlers: `on_step_overdue` records the
awaited step and returns; its loop (`late_steps`) checks at each due time, retries the start between
checks, and fails the task after the last. A restart, or a partition taken over, resumes the checks."""

from __future__ import annotations

import asyncio

from events import AgentFinished, StepOverdue, TaskCancelRequested, envelope_for, partition_of
from services.runtime.partitions import HeldPartitions
from tests.unit.test_task_runner_handlers import READY, SUBMITTED, TASK, Runner, event, started_runner

PROMPT_OVERDUE = StepOverdue(expected="PromptDelivered", after="WorkspaceReady", waited_s=30.0)


def failure(runner: Runner) -> str | None:
    return next((e.data["reason"] for e in runner.emitted() if e.type == "TaskFailed"), None)


async def awaiting_the_prompt(backoff_s: tuple[float, ...]) -> Runner:
    """A started agent whose prompt the monitor named overdue, under a backoff of `backoff_s`."""
    runner = await started_runner(agent_ran=False)
    runner.use(overdue_backoff_s=backoff_s)
    await asyncio.wait_for(runner.deliver(event(PROMPT_OVERDUE)), timeout=1.0)
    return runner


async def test_the_overdue_handler_returns_at_once_however_long_the_backoff_and_the_loop_decides_later():
    runner = await started_runner(agent_ran=False)
    runner.use(overdue_backoff_s=(60, 120, 240))
    calls_before = len(runner.starter.calls)

    # The handler retries the start once and records what it awaits: it waits for nothing.
    await asyncio.wait_for(runner.deliver(event(PROMPT_OVERDUE)), timeout=1.0)
    assert len(runner.starter.calls) == calls_before + 1 and failure(runner) is None
    assert runner.task().late_steps["PromptDelivered"].due_at == (runner.now + 60, runner.now + 180, runner.now + 420)
    # What it awaits is the task runner's own record, never published.
    assert not [e for e in runner.emitted() if e.type.startswith("LateStep")]

    # Nothing happens before a check is due; at each due check but the last, the start is retried.
    await runner.pass_time(59)
    assert len(runner.starter.calls) == calls_before + 1
    await runner.pass_time(1)
    assert len(runner.starter.calls) == calls_before + 2 and failure(runner) is None
    await runner.pass_time(120)
    assert len(runner.starter.calls) == calls_before + 3 and failure(runner) is None

    # After the last, the task fails naming the handoff and the whole wait.
    await runner.pass_time(240)
    assert failure(runner) == "PromptDelivered missing 450s after WorkspaceReady"
    assert len(runner.starter.calls) == calls_before + 3
    assert runner.task().late_steps == {} and runner.task_runner.late_steps.due == {}


async def test_a_restarted_task_runner_resumes_a_pending_check_from_its_store():
    runner = await awaiting_the_prompt((5, 10))
    await runner.pass_time(5)  # The first check: still missing, retried.
    calls_before = len(runner.starter.calls)

    # The process restarts: a new task runner over the same store knows nothing until it resumes.
    restarted = runner.use(overdue_backoff_s=(5, 10))
    assert restarted.late_steps.due == {}
    restarted.late_steps.resume()
    assert restarted.late_steps.due == {TASK: runner.now + 10}

    # The remaining check runs when it was due, and no earlier one again.
    await runner.pass_time(9)
    assert failure(runner) is None
    await runner.pass_time(1)
    assert failure(runner) == "PromptDelivered missing 45s after WorkspaceReady"
    assert len(runner.starter.calls) == calls_before


async def test_a_handoff_that_comes_between_checks_ends_the_wait_and_the_task_runs_on():
    runner = await awaiting_the_prompt((5, 10))
    await runner.pass_time(5)

    # The agent takes its prompt after all: the next check finds it, and nothing fails.
    await runner.agent_runs_turn()
    await runner.pass_time(10)
    assert failure(runner) is None and runner.task().state == "starting"
    assert runner.task().late_steps == {} and runner.task_runner.late_steps.due == {}


async def test_a_task_that_ends_while_a_check_is_pending_drops_it():
    runner = await awaiting_the_prompt((5, 10))
    # A person cancels it; the agent's cancelled turn ends it (so says the vm_agent).
    await runner.deliver(envelope_for(TaskCancelRequested(by="user"), task_id=TASK, actor="user"))
    await runner.deliver(event(AgentFinished(stop_reason="cancelled", exit_code=None)))
    assert runner.task().state == "cancelled" and runner.task_runner.late_steps.due == {}

    await runner.pass_time(15)
    assert failure(runner) is None


async def test_the_step_named_overdue_again_while_awaited_keeps_its_first_checks():
    runner = await awaiting_the_prompt((5, 10))
    due_at = runner.task().late_steps["PromptDelivered"].due_at
    await runner.pass_time(3)
    await runner.deliver(event(PROMPT_OVERDUE))  # A second StepOverdue of the same step and turn.
    assert runner.task().late_steps["PromptDelivered"].due_at == due_at


async def test_only_the_replica_holding_the_tasks_partition_works_its_checks_and_a_partition_taken_over_resumes():
    runner = Runner()
    held = HeldPartitions((0, 2))
    partition = partition_of(TASK)
    runner.use(overdue_backoff_s=(5,), held=held)
    held.change(partition, True)
    await runner.deliver(SUBMITTED)
    await runner.deliver(READY)
    await runner.deliver(event(PROMPT_OVERDUE))

    # The partition moves to another replica: its checks are that replica's, nothing is done here.
    held.change(partition, False)
    assert runner.task_runner.late_steps.due == {}
    await runner.pass_time(5)
    assert failure(runner) is None

    # It comes back: the pending check resumes from the store and, overdue, is worked at once.
    held.change(partition, True)
    await runner.pass_time(0)
    assert failure(runner) == "PromptDelivered missing 35s after WorkspaceReady"
