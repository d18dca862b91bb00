"""Follow-ups: a person's next prompt runs as the next turn of the same agent session, once, in order,
each turn with its own PromptDelivered and its own commit on the task's branch."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.support.api import Api
from tests.support.git_remote import branch_file, make_origin
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def of_type(events: list[dict], event_type: str) -> list[dict]:
    return [e for e in events if e["type"] == event_type]


def commits_on(origin: Path, branch: str) -> list[str]:
    """The subjects of the branch's commits the task made (newest first), on the origin."""
    done = subprocess.run(["git", "--git-dir", str(origin), "log", "--format=%s", f"main..{branch}"],
                          check=True, capture_output=True, text=True)
    return done.stdout.split("\n")[:-1]


def exited(pid: int) -> bool:
    """The process is gone (or a zombie, exited but not yet reaped)."""
    try:
        return b"State:\tZ" in Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return True


def test_follow_ups_run_as_next_turns_once_each_with_a_commit_of_their_own(tmp_path: Path, stack: BatonStack):
    api = Api(stack.api, stack.token)
    origin = make_origin(tmp_path)
    first, second, third = "echo go\nsleep 3\necho one > a.txt\n", "echo two > b.txt\n", "echo three > c.txt\n"
    task = api.submit(repo=origin.as_uri(), agent="shell", prompt=first)["task_id"]
    branch = f"baton/{task}"

    # A follow-up sent while the first turn sleeps waits for that turn's push.
    wait_for(lambda: any(e["type"] == "AgentOutput" and "go" in e["data"]["text"] for e in api.events(task)),
             timeout_s=60, what="the first turn to run")
    sent = api.http.post(f"/api/tasks/{task}/messages", json={"prompt": second})
    assert sent.status_code == 202, sent.text
    events = wait_for(lambda: len(of_type(e := api.events(task), "TaskCompleted")) == 2 and e,
                      timeout_s=60, what="the follow-up's turn to complete")

    # Two turns, each delivered once, with its own prompt's hash; the second after the first's push.
    delivered = of_type(events, "PromptDelivered")
    assert [d["data"] for d in delivered] == [
        {"session_id": delivered[0]["data"]["session_id"], "prompt_sha256": sha256(first)},
        {"session_id": delivered[0]["data"]["session_id"], "prompt_sha256": sha256(second), "turn": 2}]
    first_push = events.index(of_type(events, "BranchPushed")[0])
    assert events.index(delivered[1]) > first_push
    assert len(of_type(events, "FollowUpSubmitted")) == 1
    assert [e["data"].get("turn", 1) for e in of_type(events, "TaskCompleted")] == [1, 2]
    # One commit per turn on the task's branch, with both turns' files.
    assert len(commits_on(origin, branch)) == 2
    assert branch_file(origin, branch, "a.txt") == "one" and branch_file(origin, branch, "b.txt") == "two"
    done = api.wait_for_state(task, "completed", timeout_s=10)
    assert done["commit"] == of_type(events, "TaskCompleted")[-1]["data"]["commit"]

    # After completion, while the workspace lingers, a follow-up runs and the task completes again.
    sent = api.http.post(f"/api/tasks/{task}/messages", json={"prompt": third})
    assert sent.status_code == 202, sent.text
    events = wait_for(lambda: len(of_type(e := api.events(task), "TaskCompleted")) == 3 and e,
                      timeout_s=60, what="the turn after completion to complete")
    assert [d["data"].get("turn", 1) for d in of_type(events, "PromptDelivered")] == [1, 2, 3]
    assert of_type(events, "PromptDelivered")[2]["data"]["prompt_sha256"] == sha256(third)
    assert len(commits_on(origin, branch)) == 3 and branch_file(origin, branch, "c.txt") == "three"
    api.wait_for_state(task, "completed", timeout_s=10)
    # Each turn's handoffs came in time: no gap was named.
    assert not of_type(events, "StepOverdue") and not of_type(events, "AgentStalled")
    assert not of_type(events, "TaskFailed")

    # A cancelled task takes no follow-up (409, saying why); an unknown task is a 404.
    long_task = api.submit(repo=origin.as_uri(), agent="shell", prompt="echo started\nsleep 30\n")["task_id"]
    wait_for(lambda: of_type(api.events(long_task), "PromptDelivered"), timeout_s=60, what="the long task to run")
    assert api.http.post(f"/api/tasks/{long_task}/cancel").status_code == 202
    api.wait_for_state(long_task, "cancelled", timeout_s=20)
    refused = api.http.post(f"/api/tasks/{long_task}/messages", json={"prompt": "echo more\n"})
    assert refused.status_code == 409 and "cancelled" in refused.json()["detail"], refused.text
    assert api.http.post("/api/tasks/t-nosuchtask/messages", json={"prompt": "x"}).status_code == 404
    # A follow-up is checked as a first prompt is.
    assert api.http.post(f"/api/tasks/{task}/messages", json={"prompt": " "}).status_code == 422


def test_a_follow_up_after_the_workspace_was_released_re_provisions_it_and_runs_the_next_turn(tmp_path: Path):
    with running_stack(tmp_path / "stack", env={"BATON_LINGER_S": "2"}) as stack:
        api = Api(stack.api, stack.token)
        origin = make_origin(tmp_path)
        first, second = "echo one > a.txt\n", "echo two > b.txt\n"
        task = api.submit(repo=origin.as_uri(), agent="shell", prompt=first)["task_id"]
        branch = f"baton/{task}"
        api.wait_for_state(task, "completed", timeout_s=60)
        # The vm_agent leaves once BATON_LINGER_S passed without a follow-up; the provisioner says
        # the workspace was released.
        pid = stack.vm_agent_pid(task)
        released = wait_for(lambda: of_type(api.events(task), "WorkspaceReleased"), timeout_s=30,
                            what="the workspace to be released after lingering")
        assert released[0]["data"]["attempt"] == 1 and exited(pid)

        # A follow-up is still taken: it re-provisions a workspace and runs as turn 2.
        sent = api.http.post(f"/api/tasks/{task}/messages", json={"prompt": second})
        assert sent.status_code == 202, sent.text
        events = wait_for(lambda: len(of_type(e := api.events(task), "TaskCompleted")) == 2 and e,
                          timeout_s=90, what="the re-provisioned turn to complete")
        types = [e["type"] for e in events]

        # Turn 2 was asked for with a new workspace (attempt 2), from the task's branch…
        [follow_up] = of_type(events, "FollowUpSubmitted")
        [turn] = of_type(events, "TurnRequested")
        assert turn["data"] == {"turn": 2, "follow_up_id": follow_up["event_id"], "reprovision": True, "attempt": 2}
        requested = of_type(events, "WorkspaceRequested")[-1]
        assert (requested["data"]["attempt"], requested["data"]["base_branch"]) == (2, branch)
        assert types.index("TurnRequested") < events.index(requested) < events.index(of_type(events, "WorkspaceReady")[-1])
        # …and its agent session says what became of the earlier one: the shell agent cannot load
        # sessions, so it is a new one, and the note says why.
        sessions = of_type(events, "AgentSessionStarted")
        assert len(sessions) == 2 and sessions[1]["data"]["attempt_id"] == f"{task}-a2"
        restored = sessions[1]["data"]
        assert restored["resumed_from"] == sessions[0]["data"]["session_id"] and restored["restored"] == "new"
        assert "cannot load sessions" in restored["restore_note"]
        # Each turn's prompt was delivered once, with its own hash; turn 2 on the new session.
        delivered = [d["data"] for d in of_type(events, "PromptDelivered")]
        assert delivered == [
            {"session_id": sessions[0]["data"]["session_id"], "prompt_sha256": sha256(first)},
            {"session_id": restored["session_id"], "prompt_sha256": sha256(second), "turn": 2}]
        assert [e["data"].get("turn", 1) for e in of_type(events, "TaskCompleted")] == [1, 2]
        # One commit per turn on the task's branch, with both turns' files.
        assert len(commits_on(origin, branch)) == 2
        assert branch_file(origin, branch, "a.txt") == "one" and branch_file(origin, branch, "b.txt") == "two"
        # A re-provision is not a lost attempt, and no handoff was late.
        assert not {"AttemptStarted", "StepOverdue", "AgentStalled", "TaskFailed"} & set(types)
        api.wait_for_state(task, "completed", timeout_s=10)
