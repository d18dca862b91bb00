"""The control plane reaches a vm_agent over the bus only: nothing on a vm_agent listens.

Driven through `baton up` with an authenticated bus, as a user runs it; what is checked is what an
operator could see on the machine: the vm_agent processes' sockets, the events, the logs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_file, make_origin
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

LISTEN, ESTABLISHED = "0A", "01"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    with running_stack(tmp_path_factory.mktemp("vm-bus")) as running:
        yield running


def tcp_sockets(pid: int) -> dict[str, list[int]]:
    """The local ports of `pid`'s TCP sockets, by state (LISTEN `0A`, ESTABLISHED `01`, …)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    sockets: dict[str, list[int]] = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                sockets.setdefault(fields[3], []).append(int(fields[1].rsplit(":", 1)[1], 16))
    return sockets


def assert_only_connects_out(pid: int) -> None:
    sockets = tcp_sockets(pid)
    assert sockets.get(LISTEN, []) == [], f"vm_agent {pid} listens on {sockets[LISTEN]}"
    assert sockets.get(ESTABLISHED), f"vm_agent {pid} has no connection at all: {sockets}"


def pool_member_pids(stack: BatonStack) -> list[int]:
    return [int(path.read_text()) for path in (stack.data_dir / "vm_agents" / "pool").glob("*/pid")]


def test_a_warm_vm_agent_waits_for_its_task_without_listening(stack: BatonStack):
    # The pool's members are up (each said hello on the bus), and only connect out.
    pids = wait_for(lambda: pool_member_pids(stack), timeout_s=60, what="a warm vm_agent")
    wait_for(lambda: Api(stack.api, stack.token).http.get("/api/health").json()["details"]["provisioner"]
             ["warm_vm_agents"] >= 1, timeout_s=60, what="a warm vm_agent ready")
    # A member the pool started a moment ago may not have connected yet; one it stopped is gone.
    for pid in pool_member_pids(stack) or pids:
        wait_for(lambda: connected_or_gone(pid), timeout_s=60, what=f"warm vm_agent {pid} connected")
        with contextlib.suppress(FileNotFoundError):
            assert_only_connects_out(pid)


def connected_or_gone(pid: int) -> bool:
    try:
        return bool(tcp_sockets(pid).get(ESTABLISHED))
    except FileNotFoundError:
        return True


def test_a_task_runs_with_a_vm_agent_that_only_connects_out(stack: BatonStack, tmp_path: Path):
    api = Api(stack.api, stack.token)
    origin = make_origin(tmp_path)
    nonce = secrets.token_hex(8)
    task_id = api.submit(repo=origin.as_uri(), prompt=f'echo "{nonce}" > bus.txt\n', agent="shell")["task_id"]

    # The whole flow completes: assigned, started, pushed — every command went over the bus.
    events = assert_flow_completes(api, task_id, timeout_s=120)
    assert branch_file(origin, f"baton/{task_id}", "bus.txt").strip() == nonce
    # The workspace announces a bus address, not a URL anyone connects to.
    [ready] = [e for e in events if e["type"] == "WorkspaceReady"]
    assert ready["data"]["vm_agent_url"] == f"nats:baton.vm.task.{task_id}"
    # Its vm_agent lingers for a follow-up after the push; it still listens nowhere.
    assert_only_connects_out(stack.vm_agent_pid(task_id))


def test_no_credential_reaches_a_log(stack: BatonStack):
    # Member and task credentials travelled in bus requests only: no log holds one.
    for path in stack.data_dir.rglob("*.log"):
        text = path.read_text(errors="replace")
        assert "USER NKEY SEED" not in text and "NATS USER JWT" not in text, path


def test_a_vm_agent_whose_credential_expires_stops_and_the_task_ends_naming_the_lost_workspace(tmp_path: Path):
    # Credentials that expire within seconds, and no second attempt.
    env = {"BATON_VM_AGENT_CREDENTIAL_TTL_S": "8", "BATON_MAX_ATTEMPTS": "1"}
    with running_stack(tmp_path / "expiring", env=env) as expiring:
        api = Api(expiring.api, expiring.token)
        task_id = api.submit(repo=make_origin(tmp_path).as_uri(), prompt="sleep 120\n", agent="shell")["task_id"]
        # The agent outlives the credential: the bus drops the vm_agent, which stops; the task
        # ends with the lost workspace named instead of waiting for a vm_agent that hears nothing.
        events = api.wait_for_end(task_id, timeout_s=90)
        [failed] = [e for e in events if e["type"] == "TaskFailed"]
        assert "workspace was lost" in failed["data"]["reason"], failed["data"]["reason"]
        log = (expiring.data_dir / "vm_agents" / task_id / "vm_agent.log").read_text()
        assert "bus credential expired" in log
