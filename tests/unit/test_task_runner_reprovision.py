"""The task runner's decisions for a follow-up after the task's workspace was released: the turn
re-provisions a workspace from the task's branch, where the agent's session is restored."""

from __future__ import annotations

from events import SessionFailed, WorkspaceReady, WorkspaceReleased, envelope_for
from services.task_runner.handlers import TaskRunnerHandlers
from tests.unit.test_task_runner_handlers import READY, SUBMITTED, TASK, Runner, started_runner
from tests.unit.test_task_runner_turns import follow_up, pushed


def event(evt):
    return envelope_for(evt, task_id=TASK, actor="test")


def released(attempt: int = 1):
    return event(WorkspaceReleased(workspace_id=f"local-{TASK}", attempt=attempt, reason="idle"))


def ready(attempt: int):
    return event(WorkspaceReady(workspace_id=f"local-{TASK}-a{attempt}", provider="local",
                                vm_agent_url=f"http://vm:{attempt}", credential_expires_at=1_900_000_000))


def of_type(runner: Runner, event_type: str):
    return [e for e in runner.emitted() if e.type == event_type]


async def completed_and_released() -> Runner:
    """Turn 1 ran in ACP session acp-1 and pushed; then its workspace was released."""
    runner = await started_runner()
    await runner.deliver(pushed("c1"))
    await runner.deliver(released())
    return runner


async def test_a_follow_up_to_a_completed_task_whose_workspace_was_released_re_provisions_from_its_branch():
    runner = await completed_and_released()
    message = follow_up("echo two")
    await runner.deliver(message)

    # No lingering vm_agent is asked: turn 2 is requested with a new workspace (attempt 2)…
    assert [c for c in runner.starter.calls if "turn_at" in c] == []
    [turn] = of_type(runner, "TurnRequested")
    assert turn.data == {"turn": 2, "follow_up_id": message.event_id, "reprovision": True, "attempt": 2}
    # …from the task's pushed branch, caused by the follow-up; no AttemptStarted: nothing was lost.
    requested = of_type(runner, "WorkspaceRequested")[-1]
    assert (requested.data["attempt"], requested.data["base_branch"]) == (2, f"baton/{TASK}")
    assert requested.causation_id == message.event_id and not of_type(runner, "AttemptStarted")
    assert runner.task().state == "provisioning" and runner.task().follow_ups == []


async def test_the_re_provisioned_workspace_gets_the_follow_up_as_turn_n_and_the_last_session_to_restore():
    runner = await completed_and_released()
    await runner.deliver(follow_up("echo two"))
    await runner.deliver(ready(2))

    start = runner.starter.calls[-1]
    assert (start["prompt"], start["turn"], start["attempt_id"]) == ("echo two", 2, f"{TASK}-a2")
    assert start["resume_session_id"] == "acp-1" and start["vm_agent_url"] == "http://vm:2"
    # The agent runs turn 2 in the new workspace's session; its push completes the task again, as turn 2.
    await runner.agent_runs_turn()
    await runner.deliver(pushed("c2"))
    assert [(e.data.get("turn", 1), e.data["commit"]) for e in of_type(runner, "TaskCompleted")] == [
        (1, "c1"), (2, "c2")]


async def test_a_follow_up_handed_to_the_lingering_vm_agent_is_a_turn_requested_without_re_provision():
    runner = await started_runner()
    await runner.deliver(pushed("c1"))
    await runner.deliver(follow_up("echo two"))
    [turn] = of_type(runner, "TurnRequested")
    assert (turn.data["turn"], turn.data["reprovision"], turn.data["attempt"]) == (2, False, 1)
    assert len(of_type(runner, "WorkspaceRequested")) == 1


async def test_a_release_of_an_earlier_attempt_s_workspace_changes_nothing():
    runner = await started_runner()
    await runner.deliver(pushed("c1"))
    await runner.deliver(released(attempt=2))
    await runner.deliver(follow_up("echo two"))
    assert [c["turn"] for c in runner.starter.calls if "turn_at" in c] == [2]
    assert not [e for e in of_type(runner, "TurnRequested") if e.data["reprovision"]]


async def test_re_provisions_do_not_use_up_the_attempts_lost_workspaces_get():
    runner = Runner()
    runner.handlers = TaskRunnerHandlers(runner.store, runner.starter, runner.lookup, max_attempts=2).handlers()
    await runner.deliver(SUBMITTED)
    await runner.deliver(READY)
    await runner.agent_runs_turn()
    await runner.deliver(pushed("c1"))
    await runner.deliver(released())
    await runner.deliver(follow_up("echo two"))
    await runner.deliver(ready(2))  # Attempt 2: a re-provision, not a loss.
    # Its workspace is then lost mid-turn: one lost workspace of two allowed, so attempt 3 starts.
    await runner.deliver(event(SessionFailed(reason="vm_agent died", lost_workspace=True)))
    [started] = of_type(runner, "AttemptStarted")
    assert started.data["attempt"] == 3 and not of_type(runner, "TaskFailed")
    await runner.deliver(ready(3))
    # The new attempt delivers the running turn's prompt again, as that turn.
    assert (runner.starter.calls[-1]["prompt"], runner.starter.calls[-1]["turn"]) == ("echo two", 2)


async def test_a_re_provisioned_turn_pushed_without_its_own_agent_session_fails_naming_it_and_the_turn():
    runner = await completed_and_released()
    await runner.deliver(follow_up("echo two"))
    await runner.deliver(ready(2))
    # Turn 1's AgentSessionStarted is on the stream; the new workspace never started a session of its own.
    await runner.deliver(pushed("c2"))
    [failed] = of_type(runner, "TaskFailed")
    assert failed.data["reason"] == "AgentSessionStarted missing in turn 2: the flow reached BranchPushed without it"
    assert len(of_type(runner, "TaskCompleted")) == 1
