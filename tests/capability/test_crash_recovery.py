"""kill -9 any process, or stop NATS, mid-task: the task still completes, nothing lost, nothing twice."""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_file, make_origin
from tests.support.invariants import assert_nothing_lost_nothing_twice, counting_prompt
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

LINES = 40


@pytest.fixture(scope="module")
def crash_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    with running_stack(tmp_path_factory.mktemp("crash")) as running:
        yield running


def seen(api: Api, task_id: str, event_type: str) -> Callable[[], bool]:
    return lambda: any(e["type"] == event_type for e in api.events(task_id))


# (service, the event after which it is killed: "submit" = right after the 201)
KILL_POINTS = [
    ("gateway", "submit"),
    ("task-runner", "submit"),
    ("task-runner", "WorkspaceReady"),
    ("provisioner", "WorkspaceRequested"),
    ("provisioner", "AgentOutput"),
    ("projector", "AgentSessionStarted"),
    ("gateway", "AgentOutput"),
    ("task-runner", "AgentOutput"),
]


@pytest.mark.parametrize(("service", "after"), KILL_POINTS, ids=[f"{s}-after-{a}" for s, a in KILL_POINTS])
def test_a_task_survives_kill_9_of_a_service(crash_stack: BatonStack, tmp_path: Path, service: str, after: str):
    api = Api(crash_stack.api, crash_stack.token)
    origin = make_origin(tmp_path)
    nonce = secrets.token_hex(6)
    task = api.submit(repo=origin.as_uri(), prompt=counting_prompt(nonce, LINES), agent="shell")

    # Kill the service at its point in the flow; `baton up` restarts it.
    if after != "submit":
        wait_for(seen(api, task["task_id"], after), timeout_s=60, what=after)
    crash_stack.kill_service(service)

    events = assert_flow_completes(api, task["task_id"], timeout_s=120)
    assert_nothing_lost_nothing_twice(events, nonce=nonce, lines=LINES)
    assert branch_file(origin, f"baton/{task['task_id']}", "done.txt") == nonce
    api.wait_for_state(task["task_id"], "completed", timeout_s=60)


VM_AGENT_KILL_POINTS = ["AgentOutput", "PromptDelivered"]


@pytest.mark.parametrize("after", VM_AGENT_KILL_POINTS, ids=[f"after-{a}" for a in VM_AGENT_KILL_POINTS])
def test_a_task_whose_vm_agent_is_killed_completes_on_a_new_attempt(crash_stack: BatonStack, tmp_path: Path,
                                                                      after: str):
    api = Api(crash_stack.api, crash_stack.token)
    origin = make_origin(tmp_path)
    nonce = secrets.token_hex(6)
    task = api.submit(repo=origin.as_uri(), prompt=counting_prompt(nonce, LINES, pause_s=0.1), agent="shell")
    wait_for(seen(api, task["task_id"], after), timeout_s=60, what=after)

    # The first attempt's vm_agent dies mid-turn: its workspace is lost.
    os.kill(crash_stack.vm_agent_pid(task["task_id"]), signal.SIGKILL)

    events = assert_flow_completes(api, task["task_id"], timeout_s=120)
    # Each attempt started once, got its prompt once, and printed each line once, counting from 1;
    # the last one printed them all.
    assert_nothing_lost_nothing_twice(events, nonce=nonce, lines=LINES)
    # The new attempt is on the record with its reason, and ran under its own attempt id.
    [attempt] = [e for e in events if e["type"] == "AttemptStarted"]
    assert attempt["data"]["attempt"] == 2
    assert "vm_agent exited while the agent was running" in attempt["data"]["reason"]
    assert [e["data"]["attempt_id"] for e in events if e["type"] == "AgentSessionStarted"] == [
        f"{task['task_id']}-a1", f"{task['task_id']}-a2"]
    assert [e["data"].get("attempt", 1) for e in events if e["type"] == "WorkspaceRequested"] == [1, 2]
    assert branch_file(origin, f"baton/{task['task_id']}", "done.txt") == nonce
    # The lost attempt's missing handoffs are no gap: the monitor judged the attempt that ran.
    assert not [e for e in events if e["type"] in ("StepOverdue", "AgentStalled")]
    assert api.wait_for_state(task["task_id"], "completed", timeout_s=60)["gaps"] == []


def test_a_task_fails_naming_the_lost_workspace_when_attempts_run_out(tmp_path: Path):
    with running_stack(tmp_path / "stack", env={"BATON_MAX_ATTEMPTS": "1"}) as stack:
        api = Api(stack.api, stack.token)
        origin = make_origin(tmp_path)
        task = api.submit(repo=origin.as_uri(), prompt=counting_prompt("v", 400, pause_s=0.1), agent="shell")
        wait_for(seen(api, task["task_id"], "AgentOutput"), timeout_s=60, what="first AgentOutput")

        os.kill(stack.vm_agent_pid(task["task_id"]), signal.SIGKILL)

        events = api.wait_for_end(task["task_id"], timeout_s=60)
        assert events[-1]["type"] == "TaskFailed"
        reason = events[-1]["data"]["reason"]
        assert reason.startswith("the workspace was lost once") and "vm_agent exited while the agent was running" in reason
        assert not [e for e in events if e["type"] == "AttemptStarted"]
        assert api.wait_for_state(task["task_id"], "failed")["reason"] == reason
        # What the vm_agent recorded before it died still reached the stream, in order.
        outputs = [e["data"]["seq"] for e in events if e["type"] == "AgentOutput"]
        assert outputs == list(range(1, len(outputs) + 1))


def test_nothing_is_lost_when_nats_stops_mid_run_and_comes_back(tmp_path: Path):
    with running_stack(tmp_path / "stack") as stack:
        api = Api(stack.api, stack.token)
        origin = make_origin(tmp_path)
        nonce = secrets.token_hex(6)
        task = api.submit(repo=origin.as_uri(), prompt=counting_prompt(nonce, 60, pause_s=0.05), agent="shell")
        wait_for(seen(api, task["task_id"], "AgentOutput"), timeout_s=60, what="first AgentOutput")

        # NATS goes away mid-run: health says so…
        stack.nats.stop()
        wait_for(lambda: api.http.get("/api/health").json()["nats"] is False, timeout_s=30, what="health to see NATS down")
        # …and what reads the stream meanwhile is told to come back, not given a 500.
        history = api.http.get(f"/api/tasks/{task['task_id']}/events", timeout=60)
        assert history.status_code == 503 and history.headers["retry-after"].isdigit(), history.text
        assert "event bus is not answering" in history.json()["detail"]
        # …and comes back on the same port and store.
        stack.nats.start()

        events = assert_flow_completes(api, task["task_id"], timeout_s=120)
        assert_nothing_lost_nothing_twice(events, nonce=nonce, lines=60)
        wait_for(stack.healthy, timeout_s=60, what="health back to 200")
