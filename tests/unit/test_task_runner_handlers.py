"""The task runner's handlers, driven as the consumer drives them, over an in-memory store."""

from __future__ import annotations

import itertools
from hashlib import sha256

import pytest
from eventsourcing.persistence import Tracking

from events import (
    AgentFinished,
    AgentOutput,
    AgentSessionStarted,
    BranchPushed,
    Envelope,
    PromptDelivered,
    SessionFailed,
    StepOverdue,
    TaskSubmitted,
    WorkspaceFailed,
    WorkspaceReady,
    envelope_for,
)
from services.task_runner.domain import Task
from services.task_runner.handlers import TaskRunnerHandlers
from tests.unit.fakes import FakeLookup, FakeStarter, envelopes_in, popo_store

TASK = "t1"


class Runner:
    """The handlers plus what the consumer does around them (skip if processed, then track). Its
    `lookup` is the stream: every envelope delivered to the handlers and every one they emitted,
    in that order, plus the vm_agent's handoffs a test plays (`agent_runs_turn`). Its clock
    (`now`, epoch seconds) moves only when a test lets time pass (`pass_time`)."""

    def __init__(self, starter: FakeStarter | None = None) -> None:
        self.store = popo_store()
        self.starter = starter or FakeStarter()
        self.lookup = FakeLookup()
        self.now = 1_900_000_000.0
        self.use()
        self._seq = itertools.count(1)
        self._published = 0

    def use(self, **options) -> TaskRunnerHandlers:
        """The task runner (re)built with `options` (`overdue_backoff_s`, …) over the same store,
        stream and clock, as a restarted process would be."""
        self.task_runner = TaskRunnerHandlers(self.store, self.starter, self.lookup, clock=lambda: self.now,
                                              **options)
        self.handlers = self.task_runner.handlers()
        return self.task_runner

    async def pass_time(self, seconds: float = 0.0) -> None:
        """`seconds` pass; the task runner's loop works each check of a late handoff as it falls due."""
        until = self.now + seconds
        checks = self.task_runner.late_steps
        for _ in range(100):
            next_due = min((due for due in checks.due.values()), default=None)
            if next_due is None or next_due > until:
                break
            self.now = max(self.now, next_due)
            await checks.work_due_checks(self.now)
            self._publish_emitted()
        self.now = until

    async def deliver(self, envelope: Envelope, tracking: Tracking | None = None) -> Tracking:
        tracking = tracking or Tracking(f"task-runner-{envelope.type}", next(self._seq))
        self.lookup.record(envelope)
        if not self.store.is_processed(tracking):
            try:
                await self.handlers[envelope.type](envelope, tracking)
            finally:
                self._publish_emitted()
            if not self.store.is_processed(tracking):
                self.store.save_processed(tracking)
        return tracking

    def _publish_emitted(self) -> None:
        """What the handlers saved reaches the stream (the relay's job), in order."""
        emitted = self.emitted()
        for envelope in emitted[self._published:]:
            self.lookup.record(envelope)
        self._published = len(emitted)

    async def agent_runs_turn(self, *, output: bool = True) -> None:
        """The vm_agent runs the task's running turn to its end, as the task runner asked it: a new
        ACP session's AgentSessionStarted (turn 1, a new attempt, a re-provisioned turn; not a turn
        of the lingering session), that turn's PromptDelivered, AgentOutput (unless not `output`),
        then AgentFinished `end_turn` (handled). Its push is the test's to deliver."""
        task = self.task()
        vm_agent = "vm_agent"
        if not task.turn_runs_on_lingering_session:
            self.lookup.record(envelope_for(AgentSessionStarted(
                session_id=f"acp-{task.attempt}", agent=task.agent, attempt_id=task.attempt_id),
                task_id=TASK, actor=vm_agent))
        self.lookup.record(envelope_for(PromptDelivered(
            session_id=f"acp-{task.attempt}", prompt_sha256=sha256(task.turn_prompt.encode()).hexdigest(),
            turn=task.turn), task_id=TASK, actor=vm_agent))
        if output:
            self.lookup.record(envelope_for(AgentOutput(seq=1, stream="stdout", text=f"turn {task.turn}"),
                                            task_id=TASK, actor=vm_agent))
        await self.deliver(envelope_for(AgentFinished(stop_reason="end_turn", exit_code=0), task_id=TASK,
                                        actor=vm_agent))

    def emitted(self) -> list[Envelope]:
        return envelopes_in(self.store)

    def task(self) -> Task:
        return self.store.get_task_aggregate(Task, TASK)


def event(evt, **kw) -> Envelope:
    return envelope_for(evt, task_id=TASK, actor=kw.get("actor", "test"))


SUBMITTED = event(TaskSubmitted(repo="file:///r", prompt="write tests", agent="shell"))
READY = event(WorkspaceReady(workspace_id="w1", provider="local", vm_agent_url="http://vm:1",
                             credential_expires_at=1_900_000_000))


async def started_runner(starter: FakeStarter | None = None, *, agent_ran: bool = True) -> Runner:
    """A task whose agent was started on its workspace and (`agent_ran`) ran turn 1 to its end."""
    runner = Runner(starter)
    await runner.deliver(SUBMITTED)
    await runner.deliver(READY)
    if agent_ran:
        await runner.agent_runs_turn()
    return runner


async def test_task_submitted_creates_a_task_that_requests_a_workspace_caused_by_the_submission():
    runner = Runner()
    tracking = await runner.deliver(SUBMITTED)
    [requested] = runner.emitted()
    assert requested.type == "WorkspaceRequested"
    assert requested.causation_id == SUBMITTED.event_id
    assert requested.actor == "service:task-runner"
    assert requested.data == {
        "repo": "file:///r", "agent": "shell", "base_branch": None, "provider": "local"
    }
    assert runner.store.is_processed(tracking)
    assert runner.task().state == "provisioning"


async def test_the_same_submission_redelivered_with_the_same_tracking_changes_nothing():
    runner = Runner()
    tracking = await runner.deliver(SUBMITTED)
    log_before = runner.store.process_recorder.max_notification_id()
    await runner.deliver(SUBMITTED, tracking)
    assert runner.store.process_recorder.max_notification_id() == log_before
    assert [e.type for e in runner.emitted()] == ["WorkspaceRequested"]


async def test_a_second_submission_of_the_same_task_under_a_new_position_creates_nothing():
    runner = Runner()
    await runner.deliver(SUBMITTED)
    second = await runner.deliver(SUBMITTED)
    assert [e.type for e in runner.emitted()] == ["WorkspaceRequested"]
    assert runner.store.is_processed(second)


async def test_workspace_ready_starts_the_agent_once_with_the_prompt_agent_and_an_attempt_id():
    runner = await started_runner()
    assert runner.starter.calls == [{
        "vm_agent_url": "http://vm:1", "task_id": TASK, "agent": "shell",
        "prompt": "write tests", "attempt_id": "t1-a1", "causation_id": READY.event_id,
        "token_expires_at": 1_900_000_000,  # The token the task runner derives names its expiry.
        "permission_policy": "auto", "turn": 1, "resume_session_id": None,
    }]
    task = runner.task()
    assert (task.state, task.attempt, task.vm_agent_url) == ("starting", 1, "http://vm:1")
    await runner.deliver(READY)  # a second WorkspaceReady while starting
    assert len(runner.starter.calls) == 1


async def test_an_agent_start_refusal_fails_the_task_with_the_error_in_the_reason():
    runner = await started_runner(FakeStarter(refuse_with="vm_agent refused (503): busy"), agent_ran=False)
    failed = runner.emitted()[-1]
    assert failed.type == "TaskFailed"
    assert failed.data["reason"] == "could not start the agent: vm_agent refused (503): busy"
    assert failed.causation_id == READY.event_id
    assert runner.task().state == "failed"


async def test_a_failed_workspace_fails_the_task_with_workspace_failed_and_the_reason():
    runner = Runner()
    await runner.deliver(SUBMITTED)
    cause = event(WorkspaceFailed(reason="clone failed: no such repo"))
    await runner.deliver(cause)
    failed = runner.emitted()[-1]
    assert (failed.type, failed.data) == ("TaskFailed", {"reason": "workspace failed: clone failed: no such repo"})
    assert failed.causation_id == cause.event_id


async def test_an_agent_that_ends_its_turn_normally_emits_nothing():
    runner = await started_runner(agent_ran=False)
    before = runner.emitted()
    tracking = await runner.deliver(event(AgentFinished(stop_reason="end_turn", exit_code=0)))
    assert runner.emitted() == before
    assert runner.store.is_processed(tracking)
    assert runner.task().state == "starting"


async def test_an_agent_that_refused_with_exit_code_7_fails_the_task_mentioning_it():
    runner = await started_runner(agent_ran=False)
    await runner.deliver(event(AgentFinished(stop_reason="refusal", exit_code=7)))
    failed = runner.emitted()[-1]
    assert failed.type == "TaskFailed"
    assert failed.data["reason"] == "agent stopped: refusal, exit code 7"
    assert "exit code 7" in failed.data["reason"]


async def test_a_session_failure_fails_the_task_with_its_reason_verbatim():
    runner = await started_runner(agent_ran=False)
    await runner.deliver(event(SessionFailed(reason="push rejected")))
    assert runner.emitted()[-1].data == {"reason": "push rejected"}


async def test_a_pushed_branch_completes_the_task_with_its_branch_and_commit():
    runner = await started_runner()
    pushed = event(BranchPushed(branch="baton/t1", commit="abc123"))
    await runner.deliver(pushed)
    completed = runner.emitted()[-1]
    assert completed.type == "TaskCompleted"
    assert completed.data == {"branch": "baton/t1", "commit": "abc123"}
    assert completed.causation_id == pushed.event_id
    assert runner.task().state == "completed"


@pytest.mark.parametrize("late", [
    event(SessionFailed(reason="late")),
    event(AgentFinished(stop_reason="cancelled", exit_code=1)),
    event(WorkspaceFailed(reason="late")),
    event(BranchPushed(branch="b2", commit="c2")),
    READY,
])
async def test_nothing_after_a_terminal_event_emits_a_second_terminal_event(late):
    runner = await started_runner()
    await runner.deliver(event(BranchPushed(branch="baton/t1", commit="abc")))
    tracking = await runner.deliver(late)
    terminal = [e for e in runner.emitted() if e.type in ("TaskCompleted", "TaskFailed")]
    assert [(e.type, e.data) for e in terminal] == [
        ("TaskCompleted", {"branch": "baton/t1", "commit": "abc"})
    ]
    assert len(runner.starter.calls) == 1
    assert runner.store.is_processed(tracking)


async def test_events_for_an_unknown_task_are_tracked_and_ignored():
    runner = Runner()
    tracking = await runner.deliver(event(BranchPushed(branch="b", commit="c")))
    assert runner.emitted() == []
    assert runner.store.is_processed(tracking)


async def test_a_refused_restart_of_an_attempt_the_stream_shows_started_does_not_fail_the_task():
    # A redelivered WorkspaceReady reaches a vm_agent that already ran this attempt and exited.
    runner = Runner(FakeStarter(refuse_with="connection refused"))
    await runner.deliver(SUBMITTED)
    started = event(AgentSessionStarted(session_id="s", agent="shell", attempt_id=f"{TASK}-a1"))
    runner.lookup.record(started)

    await runner.deliver(READY)

    assert [e.type for e in runner.emitted()] == ["WorkspaceRequested"]
    assert runner.task().state == "starting"


async def test_a_push_without_agent_output_on_the_stream_fails_the_task_naming_the_gap():
    runner = await started_runner(agent_ran=False)
    # The agent's turn shows no AgentOutput on the stream (what the agent_output fault produces).
    await runner.agent_runs_turn(output=False)

    await runner.deliver(event(BranchPushed(branch="baton/t1", commit="c0ffee")))

    failed = runner.emitted()[-1]
    assert failed.type == "TaskFailed"
    assert failed.data["reason"] == "AgentOutput missing: the flow reached BranchPushed without it"


async def test_an_overdue_prompt_is_retried_with_the_same_attempt_then_fails_naming_the_handoff():
    runner = await started_runner(agent_ran=False)  # The prompt is never delivered.
    runner.use(overdue_backoff_s=(0, 0))
    calls_before = len(runner.starter.calls)

    overdue = StepOverdue(expected="PromptDelivered", after="WorkspaceReady", waited_s=30.0)
    await runner.deliver(event(overdue))
    await runner.pass_time()  # The loop's checks, both due at once.

    retries = runner.starter.calls[calls_before:]
    assert len(retries) == 2 and {c["attempt_id"] for c in retries} == {f"{TASK}-a1"}
    assert runner.emitted()[-1].data["reason"] == "PromptDelivered missing 30s after WorkspaceReady"


async def test_an_overdue_step_that_arrives_while_waiting_does_not_fail_the_task():
    runner = await started_runner()
    runner.use(overdue_backoff_s=(0,))

    await runner.deliver(event(StepOverdue(expected="AgentOutput", after="PromptDelivered", waited_s=5)))
    await runner.pass_time()

    assert "TaskFailed" not in [e.type for e in runner.emitted()]
    assert runner.task().late_steps == {} and runner.task_runner.late_steps.due == {}


async def test_a_vm_agent_silent_on_the_start_is_taken_as_started_and_the_prompts_deadline_decides():
    starter = FakeStarter()
    starter.silent_on_start = True
    runner = await started_runner(starter, agent_ran=False)
    # It may have started the agent: the task is not failed, and nothing is started a second way.
    assert runner.task().state == "starting" and "TaskFailed" not in [e.type for e in runner.emitted()]

    runner.use(overdue_backoff_s=(0,))
    await runner.deliver(event(StepOverdue(expected="PromptDelivered", after="WorkspaceReady", waited_s=30.0)))
    await runner.pass_time()
    # The deadline's retry asks for the same attempt (which starts nothing twice), then fails naming the gap.
    assert {c["attempt_id"] for c in starter.calls} == {f"{TASK}-a1"} and len(starter.calls) == 2
    assert runner.emitted()[-1].data["reason"] == "PromptDelivered missing 30s after WorkspaceReady"
