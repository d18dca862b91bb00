"""The task runner's decisions when a task's workspace is lost mid-run: a new attempt, or the end."""

from __future__ import annotations

import itertools

from eventsourcing.persistence import Tracking

from events import (
    BranchPushed,
    Envelope,
    SessionFailed,
    TaskCancelRequested,
    TaskSubmitted,
    WorkspaceReady,
    envelope_for,
)
from services.task_runner.domain import Task
from services.task_runner.handlers import TaskRunnerHandlers
from tests.unit.fakes import FakeLookup, FakeStarter, envelopes_in, popo_store

TASK = "t1"
LOST = "the workspace's vm_agent exited while the agent was running; the run was lost"


class Runner:
    """The handlers as the consumer drives them, over an in-memory store."""

    def __init__(self, *, max_attempts: int = 3) -> None:
        self.store = popo_store()
        self.starter = FakeStarter()
        self.lookup = FakeLookup()
        self.handlers = TaskRunnerHandlers(self.store, self.starter, self.lookup,
                                           max_attempts=max_attempts).handlers()
        self._seq = itertools.count(1)

    async def deliver(self, envelope: Envelope) -> None:
        tracking = Tracking(f"task-runner-{envelope.type}", next(self._seq))
        await self.handlers[envelope.type](envelope, tracking)
        if not self.store.is_processed(tracking):
            self.store.save_processed(tracking)

    def emitted(self, *types: str) -> list[Envelope]:
        return [e for e in envelopes_in(self.store) if not types or e.type in types]

    def task(self) -> Task:
        return self.store.get_task_aggregate(Task, TASK)


def event(evt) -> Envelope:
    return envelope_for(evt, task_id=TASK, actor="test")


def ready(n: int) -> Envelope:
    return event(WorkspaceReady(workspace_id=f"w{n}", provider="local", vm_agent_url=f"http://vm:{n}"))


def lost() -> Envelope:
    return event(SessionFailed(reason=LOST, lost_workspace=True))


async def running(max_attempts: int = 3, base_branch: str | None = "main") -> Runner:
    runner = Runner(max_attempts=max_attempts)
    await runner.deliver(event(TaskSubmitted(repo="file:///r", prompt="p", agent="shell", base_branch=base_branch)))
    await runner.deliver(ready(1))
    return runner


async def test_a_lost_workspace_starts_attempt_2_from_the_base_branch_saying_why():
    runner = await running()
    await runner.deliver(lost())

    started, requested = runner.emitted("AttemptStarted", "WorkspaceRequested")[-2:]
    assert (started.type, started.data) == ("AttemptStarted", {"attempt": 2, "reason": LOST, "base_branch": "main"})
    assert requested.type == "WorkspaceRequested" and requested.data["attempt"] == 2
    assert requested.data["base_branch"] == "main"
    assert not runner.emitted("TaskFailed", "TaskQueued")
    assert runner.task().state == "provisioning"


async def test_the_new_attempt_gets_its_own_attempt_id_and_the_same_prompt():
    runner = await running()
    await runner.deliver(lost())
    await runner.deliver(ready(2))

    first, second = [c for c in runner.starter.calls if "attempt_id" in c]
    assert (first["attempt_id"], second["attempt_id"]) == (f"{TASK}-a1", f"{TASK}-a2")
    assert second["vm_agent_url"] == "http://vm:2" and second["prompt"] == first["prompt"] == "p"


async def test_a_new_attempt_starts_from_the_pushed_branch_when_there_is_one():
    runner = await running()
    runner.lookup.last[(TASK, "BranchPushed")] = event(BranchPushed(branch=f"baton/{TASK}", commit="c1"))
    await runner.deliver(lost())
    [requested] = [e for e in runner.emitted("WorkspaceRequested") if e.data.get("attempt") == 2]
    assert requested.data["base_branch"] == f"baton/{TASK}"


async def test_when_attempts_run_out_the_task_fails_naming_the_lost_workspace():
    runner = await running(max_attempts=2)
    await runner.deliver(lost())
    await runner.deliver(ready(2))
    await runner.deliver(lost())

    [failed] = runner.emitted("TaskFailed")
    assert failed.data["reason"].startswith("the workspace was lost 2 times")
    assert LOST in failed.data["reason"]
    assert len(runner.emitted("AttemptStarted")) == 1


async def test_with_one_attempt_a_lost_workspace_fails_the_task_at_once():
    runner = await running(max_attempts=1)
    await runner.deliver(lost())
    [failed] = runner.emitted("TaskFailed")
    assert failed.data["reason"] == f"the workspace was lost once (no attempts left): {LOST}"


async def test_a_loss_reported_twice_starts_one_new_attempt():
    runner = await running()
    await runner.deliver(lost())
    await runner.deliver(lost())  # e.g. the vm_agent's own restart said so too
    assert len(runner.emitted("AttemptStarted")) == 1


async def test_a_session_failure_that_is_not_a_lost_workspace_still_fails_the_task():
    runner = await running()
    await runner.deliver(event(SessionFailed(reason="git push failed")))
    [failed] = runner.emitted("TaskFailed")
    assert failed.data["reason"] == "git push failed" and not runner.emitted("AttemptStarted")


async def test_a_lost_workspace_of_a_task_being_cancelled_ends_it_cancelled():
    runner = await running()
    await runner.deliver(event(TaskCancelRequested(by="user")))
    await runner.deliver(lost())
    assert [e.type for e in runner.emitted("TaskCancelled", "AttemptStarted", "TaskFailed")] == ["TaskCancelled"]


async def test_a_cancel_while_the_new_attempt_is_provisioned_ends_the_task_cancelled_without_starting_it():
    runner = await running()
    await runner.deliver(lost())
    await runner.deliver(event(TaskCancelRequested(by="user")))
    await runner.deliver(ready(2))
    assert runner.emitted("TaskCancelled")
    assert [c["attempt_id"] for c in runner.starter.calls if "prompt" in c] == [f"{TASK}-a1"]
