"""Stopping `baton up`, however it ends, leaves no process of its data dir behind.

Every process `baton up` starts, and every one those start (vm_agents, agents), carries the
data dir in its environment; after a stop none of them may remain, and a later `baton up` on
the same data dir starts as if nothing had happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import make_origin
from tests.support.invariants import counting_prompt
from tests.support.processes import REPO_ROOT, BatonStack, NatsServer
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

STOP_DEADLINE_S = 60  # Generous: a stop takes seconds; only a hang may fail this.


def processes_of(data_dir: Path) -> dict[int, str]:
    """{pid: command line} of every live process whose environment has BATON_DATA_DIR=data_dir."""
    wanted = os.path.realpath(data_dir)
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        values = [item[len(b"BATON_DATA_DIR="):] for item in environ if item.startswith(b"BATON_DATA_DIR=")]
        if state != "Z" and any(os.path.realpath(v.decode(errors="replace")) == wanted for v in values):
            found[int(entry.name)] = cmdline.strip()
    return found


def none_left(data_dir: Path) -> None:
    left: dict[int, str] = {}

    def gone() -> bool:
        left.clear()
        left.update(processes_of(data_dir))
        return not left

    try:
        wait_for(gone, timeout_s=STOP_DEADLINE_S, what=f"every process of {data_dir} to exit")
    except AssertionError as error:
        raise AssertionError(f"{error}; still running: {left}") from None


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(store_dir=tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[list[BatonStack]]:
    """The stacks a test starts (all on tmp_path/baton); whatever they leave is ended after it."""
    started: list[BatonStack] = []
    try:
        yield started
    finally:
        for stack in started:
            stack.stop()
        for pid in processes_of(tmp_path / "baton"):  # Only if the test failed: no leak either way.
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_stack(stacks: list[BatonStack], nats: NatsServer, data_dir: Path) -> BatonStack:
    stack = BatonStack(nats=nats, data_dir=data_dir)
    stacks.append(stack)
    return stack.start()


def nice_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def start_long_task(api: Api, origin: Path) -> str:
    """A task whose agent is still running when the stack is stopped; its id."""
    task = api.submit(repo=origin.as_uri(), prompt=counting_prompt("long", 3000, pause_s=0.1), agent="shell")
    wait_for(lambda: any(e["type"] == "AgentOutput" for e in api.events(task["task_id"])),
             timeout_s=90, what="the long task's first AgentOutput")
    return task["task_id"]


def test_sigterm_stops_every_process_of_the_data_dir(tmp_path: Path, nats: NatsServer, stacks: list[BatonStack]):
    stack = start_stack(stacks, nats, tmp_path / "baton")
    api = Api(stack.api, stack.token)
    origin = make_origin(tmp_path)
    for i in range(2):
        task = api.submit(repo=origin.as_uri(), prompt=f"echo {i} > f{i}.txt", agent="shell")
        assert_flow_completes(api, task["task_id"], timeout_s=90)
    long_task = start_long_task(api, origin)
    vm_agent = stack.vm_agent_pid(long_task)
    running = processes_of(stack.data_dir)
    assert vm_agent in running, running
    # The vm_agent's agent, and what the agent runs, are found the same way.
    assert any("vm_agent.agents.shell" in command for command in running.values()), running
    # Task work runs at a lower CPU priority than the services (BATON_TASK_NICE, 5 by default):
    # the vm_agent and everything it started.
    assert nice_of(vm_agent) == 5 and nice_of(stack.service_pid("provisioner")) == 0
    assert {nice_of(pid) for pid, command in running.items() if "vm_agent.agents.shell" in command} == {5}

    # A second `baton up` on the same data dir refuses, and leaves the first alone.
    second = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "up", "--port", "1", "--data-dir", str(stack.data_dir),
         "--nats-url", nats.url],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert second.returncode == 1, second.stdout + second.stderr
    assert "another `baton up`" in second.stdout, second.stdout
    assert stack.healthy() and vm_agent in processes_of(stack.data_dir)

    # SIGTERM, then an impatient Ctrl-C or two: the stop still ends everything.
    assert stack.process is not None
    stack.process.send_signal(signal.SIGTERM)
    for _ in range(2):
        if stack.process.poll() is None:
            stack.process.send_signal(signal.SIGINT)
    assert stack.process.wait(STOP_DEADLINE_S) == 0, stack.logs()
    none_left(stack.data_dir)
    assert "stopped in" in stack.log_path.read_text()


def test_sigkill_of_baton_up_takes_its_processes_along(tmp_path: Path, nats: NatsServer, stacks: list[BatonStack]):
    data_dir = tmp_path / "baton"
    stack = start_stack(stacks, nats, data_dir)
    api = Api(stack.api, stack.token)
    origin = make_origin(tmp_path)
    long_task = start_long_task(api, origin)
    services = {name: stack.service_pid(name) for name in ("gateway", "task-runner", "provisioner", "projector", "monitor")}
    assert set(services.values()) | {stack.vm_agent_pid(long_task)} <= processes_of(data_dir).keys()

    assert stack.process is not None
    stack.process.kill()  # `baton up` alone: no chance to stop anything itself.
    stack.process.wait(STOP_DEADLINE_S)

    # Its services die with it, and the provisioner takes the vm_agents and agents along.
    none_left(data_dir)

    # A later `baton up` on the same data dir is not in the way of anything left: it starts, the
    # task that lost its vm_agent ends with a reason, and new tasks run.
    again = start_stack(stacks, nats, data_dir)
    api = Api(again.api, again.token)
    ended = api.wait_for_end(long_task, timeout_s=120)
    assert ended[-1]["type"] == "TaskFailed", [e["type"] for e in ended]
    assert "vm_agent" in ended[-1]["data"]["reason"], ended[-1]["data"]["reason"]
    task = api.submit(repo=origin.as_uri(), prompt="echo after > after.txt", agent="shell")
    assert_flow_completes(api, task["task_id"], timeout_s=90)
