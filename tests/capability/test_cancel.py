"""Cancel: a queued task never starts, a running agent is stopped within seconds, an ended task is a 409."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_commit, make_origin
from tests.support.processes import BatonStack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability


def processes_running(marker: str) -> list[int]:
    """Pids of every process on this machine whose command line holds `marker`."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue  # Gone meanwhile.
    return found


def test_cancel_stops_a_running_agent_within_seconds_and_a_queued_task_never_starts(
        tmp_path: Path, one_place: BatonStack):
    stack = one_place
    api = Api(stack.api, stack.token)
    origin = make_origin(tmp_path)
    # A unique sleep (`sleep 60.<digits>`) names the agent's long command among the machine's processes.
    marker = f"sleep 60.{secrets.randbelow(10**6):06d}"
    long_task = api.submit(repo=origin.as_uri(), agent="shell",
                           prompt=f"echo started\n{marker}\necho never > after.txt\n")["task_id"]
    waiting = api.submit(repo=origin.as_uri(), agent="shell", prompt="echo should never run\n")["task_id"]
    wait_for(lambda: api.task(waiting)["queue_position"] == 1, timeout_s=30, what="the second task to wait")

    # The queued task is cancelled at once and never gets a place.
    assert api.http.post(f"/api/tasks/{waiting}/cancel", json={"reason": "not needed"}).status_code == 202
    queued_events = api.wait_for_end(waiting, timeout_s=10)
    assert [e["type"] for e in queued_events] == ["TaskSubmitted", "TaskQueued", "TaskCancelRequested",
                                                  "TaskCancelled"]
    assert queued_events[-1]["data"] == {"by": "user", "reason": "not needed", "pushed": False,
                                         "branch": None, "commit": None}

    # The long task's agent runs its command…
    wait_for(lambda: any(e["type"] == "AgentOutput" and "started" in e["data"]["text"]
                         for e in api.events(long_task)), timeout_s=60, what="the agent to start its turn")
    wait_for(lambda: processes_running(marker), timeout_s=10, what="the long command to run")
    # …and a cancel ends the task within 10 s, its process tree gone.
    asked_at = time.monotonic()
    response = api.http.post(f"/api/tasks/{long_task}/cancel")
    assert response.status_code == 202, response.text
    events = api.wait_for_end(long_task, timeout_s=10)
    assert time.monotonic() - asked_at < 10
    assert events[-1]["type"] == "TaskCancelled"
    assert events[-1]["data"]["by"] == "user" and events[-1]["data"]["pushed"] is False
    finished = [e for e in events if e["type"] == "AgentFinished"]
    assert [e["data"]["stop_reason"] for e in finished] == ["cancelled"]
    wait_for(lambda: not processes_running(marker), timeout_s=5, what="the agent's command to be gone")
    # Nothing was pushed, before or after.
    assert not [e for e in events if e["type"] == "BranchPushed"]
    assert branch_commit(origin, f"baton/{long_task}") is None
    assert api.wait_for_state(long_task, "cancelled", timeout_s=10)["reason"] == "cancelled by user"
    # No gap was named for what the cancel left undone.
    assert not [e for e in events if e["type"] == "StepOverdue"]

    # An ended task cannot be cancelled (409, saying why); an unknown one is a 404.
    done = api.submit(repo=origin.as_uri(), agent="shell", prompt="echo quick\n")["task_id"]
    assert_flow_completes(api, done, timeout_s=60)
    api.wait_for_state(done, "completed", timeout_s=10)
    for ended in (done, long_task):
        refused = api.http.post(f"/api/tasks/{ended}/cancel")
        assert refused.status_code == 409 and "already ended" in refused.json()["detail"], refused.text
    assert api.http.post(f"/api/tasks/{'0' * 16}/cancel").status_code == 404
    assert branch_commit(origin, f"baton/{long_task}") is None
