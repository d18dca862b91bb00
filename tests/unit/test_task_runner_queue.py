"""The fair queue's decisions in the task runner: places, the line, and what survives a restart."""

from __future__ import annotations

import itertools

from eventsourcing.persistence import Tracking

from events import (
    AgentFinished,
    BranchPushed,
    Envelope,
    SessionFailed,
    TaskCancelRequested,
    TaskSubmitted,
    WorkspaceFailed,
    WorkspaceReady,
    envelope_for,
)
from services.task_runner.handlers import TaskRunnerHandlers
from services.task_runner.queue import RunQueue
from tests.unit.fakes import FakeLookup, FakeStarter, envelopes_in, popo_store

TASKS = [f"t{n}" for n in range(1, 6)]


class QueueRunner:
    """Task-runner handlers with a place limit, driven as the consumer drives them."""

    def __init__(self, *, max_running: int, store=None) -> None:
        self.store = store or popo_store()
        self.lookup = FakeLookup()
        for task_id in TASKS:
            self.lookup.has_whole_flow(task_id)
        self.runner = TaskRunnerHandlers(self.store, FakeStarter(), self.lookup, max_running=max_running)
        self.handlers = self.runner.handlers()
        self._seq = itertools.count(1)

    async def deliver(self, envelope: Envelope, tracking: Tracking | None = None) -> Tracking:
        tracking = tracking or Tracking(f"task-runner-{envelope.type}", next(self._seq) + 1000 * len(TASKS))
        if not self.store.is_processed(tracking):
            await self.handlers[envelope.type](envelope, tracking)
        return tracking

    def emitted(self, event_type: str) -> list[str]:
        return [e.task_id for e in envelopes_in(self.store) if e.type == event_type]


def submitted(task_id: str) -> Envelope:
    return envelope_for(TaskSubmitted(repo="file:///r", prompt="p", agent="shell"), task_id=task_id, actor="user")


def pushed(task_id: str) -> Envelope:
    return envelope_for(BranchPushed(branch=f"baton/{task_id}", commit="c" * 40), task_id=task_id, actor="vm_agent")


async def test_tasks_beyond_the_limit_wait_queued_in_the_order_they_came():
    runner = QueueRunner(max_running=2)
    for task_id in TASKS:
        await runner.deliver(submitted(task_id))
    # Two get a place at once; the other three are told their place in the line.
    assert runner.emitted("WorkspaceRequested") == ["t1", "t2"]
    queued = [e for e in envelopes_in(runner.store) if e.type == "TaskQueued"]
    assert [(e.task_id, e.data["position"], e.data["max_running"]) for e in queued] == [
        ("t3", 1, 2), ("t4", 2, 2), ("t5", 3, 2)]
    assert runner.runner.queue().waiting == ["t3", "t4", "t5"]


async def test_a_task_that_ends_gives_its_place_to_the_oldest_waiting_task_in_the_same_transaction():
    runner = QueueRunner(max_running=2)
    for task_id in TASKS:
        await runner.deliver(submitted(task_id))
    push = pushed("t2")
    await runner.deliver(push)
    # t2 completed and t3 got its place: its WorkspaceRequested was caused by t2's push.
    assert runner.emitted("TaskCompleted") == ["t2"]
    assert runner.emitted("WorkspaceRequested") == ["t1", "t2", "t3"]
    requested_t3 = [e for e in envelopes_in(runner.store) if e.type == "WorkspaceRequested"][-1]
    assert requested_t3.causation_id == push.event_id
    assert runner.runner.queue().running == ["t1", "t3"]
    assert runner.runner.queue().position_of("t5") == 2


async def test_a_failed_task_frees_its_place_too():
    runner = QueueRunner(max_running=1)
    await runner.deliver(submitted("t1"))
    await runner.deliver(submitted("t2"))
    await runner.deliver(envelope_for(WorkspaceFailed(reason="no clone"), task_id="t1", actor="provisioner"))
    assert runner.emitted("TaskFailed") == ["t1"]
    assert runner.emitted("WorkspaceRequested") == ["t1", "t2"]


async def test_an_end_redelivered_frees_no_second_place():
    runner = QueueRunner(max_running=1)
    for task_id in TASKS[:3]:
        await runner.deliver(submitted(task_id))
    failed = envelope_for(SessionFailed(reason="gone"), task_id="t1", actor="vm_agent")
    tracking = await runner.deliver(failed)
    await runner.deliver(failed, tracking)  # The same message again: already processed.
    await runner.deliver(failed)  # A copy under a new position: the task is over already.
    assert runner.emitted("WorkspaceRequested") == ["t1", "t2"]
    assert runner.runner.queue().running == ["t2"]


async def test_a_restarted_runner_rebuilds_the_line_and_places_from_its_store():
    first = QueueRunner(max_running=2)
    for task_id in TASKS:
        await first.deliver(submitted(task_id))
    # A new process on the same store: the queue is replayed, not started afresh.
    second = QueueRunner(max_running=2, store=first.store)
    assert second.runner.queue().running == ["t1", "t2"]
    assert second.runner.queue().waiting == ["t3", "t4", "t5"]
    await second.deliver(pushed("t1"))
    assert second.emitted("WorkspaceRequested") == ["t1", "t2", "t3"]


async def test_a_save_that_fails_leaves_no_decision_behind():
    runner = QueueRunner(max_running=1)
    await runner.deliver(submitted("t1"))
    await runner.deliver(submitted("t2"))
    save = runner.store.save_processed

    def crash(*args, **kwargs):
        raise RuntimeError("the database went away")

    runner.store.save_processed = crash
    try:
        await runner.deliver(pushed("t1"))
    except RuntimeError:
        pass
    runner.store.save_processed = save
    # Nothing was committed, so the copy in memory is dropped: t2 still waits, t1 still runs.
    assert runner.runner.queue().running == ["t1"]
    assert runner.runner.queue().waiting == ["t2"]
    await runner.deliver(pushed("t1"))
    assert runner.emitted("WorkspaceRequested") == ["t1", "t2"]


def test_a_task_ended_while_it_waited_never_gets_a_place():
    queue = RunQueue()
    queue.place("t1")
    queue.wait("t2")
    queue.release("t2")
    queue.release("t1")
    assert queue.next_waiting(1) is None
    assert not queue.holds("t2")


def cancel_asked(task_id: str) -> Envelope:
    return envelope_for(TaskCancelRequested(by="user", reason="wrong prompt"), task_id=task_id, actor="user")


async def test_a_queued_task_cancelled_ends_at_once_and_never_gets_a_place():
    runner = QueueRunner(max_running=1)
    for task_id in TASKS[:3]:
        await runner.deliver(submitted(task_id))
    await runner.deliver(cancel_asked("t2"))
    [cancelled] = [e for e in envelopes_in(runner.store) if e.type == "TaskCancelled"]
    assert (cancelled.task_id, cancelled.data["by"], cancelled.data["pushed"]) == ("t2", "user", False)
    # t1 ends: t3 gets the place, t2 never does.
    await runner.deliver(pushed("t1"))
    assert runner.emitted("WorkspaceRequested") == ["t1", "t3"]


async def test_a_running_task_cancelled_asks_its_vm_agent_to_stop_and_ends_on_the_cancelled_turn():
    runner = QueueRunner(max_running=1)
    await runner.deliver(submitted("t1"))
    await runner.deliver(submitted("t2"))
    ready = envelope_for(WorkspaceReady(workspace_id="w", provider="local", vm_agent_url="http://vm:1"),
                         task_id="t1", actor="provisioner")
    await runner.deliver(ready)
    await runner.deliver(cancel_asked("t1"))
    assert runner.runner.starter.calls[-1]["cancel_at"] == "http://vm:1"
    assert runner.runner.starter.calls[-1]["attempt_id"] == "t1-a1"
    assert runner.emitted("TaskCancelled") == []  # Not before the agent stopped.
    await runner.deliver(envelope_for(AgentFinished(stop_reason="cancelled", exit_code=None), task_id="t1",
                                      actor="agent:shell"))
    assert runner.emitted("TaskCancelled") == ["t1"]
    assert runner.emitted("TaskFailed") == []
    assert runner.emitted("WorkspaceRequested") == ["t1", "t2"]


async def test_a_task_cancelled_while_provisioning_never_starts_its_agent():
    runner = QueueRunner(max_running=2)
    await runner.deliver(submitted("t1"))
    await runner.deliver(cancel_asked("t1"))
    ready = envelope_for(WorkspaceReady(workspace_id="w", provider="local", vm_agent_url="http://vm:1"),
                         task_id="t1", actor="provisioner")
    await runner.deliver(ready)
    assert [c for c in runner.runner.starter.calls if "initial_prompt" in c or "prompt" in c] == []
    assert runner.emitted("TaskCancelled") == ["t1"]


async def test_a_cancel_of_an_ended_task_changes_nothing():
    runner = QueueRunner(max_running=2)
    await runner.deliver(submitted("t1"))
    await runner.deliver(pushed("t1"))
    await runner.deliver(cancel_asked("t1"))
    assert runner.emitted("TaskCancelled") == []
    assert runner.emitted("TaskCompleted") == ["t1"]
