"""The provisioner's warm pool against real processes: a real zygote forks real vm_agents that
connect to a real nats-server and warm a real shell agent.

Nothing is mocked; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.provisioner.local import stop_unrecorded_vm_agent
from services.provisioner.members import VmAgentError, process_alive
from services.provisioner.vm_agents import VmAgentPool
from services.runtime.settings import Settings
from tests.support.processes import NatsServer, free_port
from tests.support.waiting import wait_for
from vm_agent import workspace_lock

DEADLINE_S = 60.0
CANNOT_START_DEADLINE_S = 3.0
"""How long a vm_agent that cannot call home is given before its take fails."""


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    try:
        yield server
    finally:
        server.stop()


def _settings(tmp_path: Path, nats_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "baton", nats_url=nats_url, secret=secrets.token_hex(32))


def _parent_and_session(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[3])  # ppid, session id


def _end_all(pool: VmAgentPool) -> None:
    """Whatever happened in the test, no vm_agent it started outlives it: those with a pid file,
    and one the zygote forked for a refill still in flight when the test ended (found by where its
    output goes, once the zygote is gone)."""
    pool.stop_idle()
    zygote = pool.zygote._process
    if zygote is not None:
        wait_for(lambda: zygote.poll() is not None, timeout_s=DEADLINE_S, what="the zygote to exit")
    pids = {int(pid_file.read_text()) for pid_file in pool.pool_dir.glob("*/pid")}
    data_dir = str(pool.pool_dir.parent.parent)  # Its output: its own log, or the zygote's before it has one.
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.readlink(entry / "fd" / "1").startswith(data_dir):
                pids.add(int(entry.name))
        except OSError:
            pass
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


def test_a_pool_member_is_forked_from_the_zygote_with_its_agent_warm(tmp_path: Path, nats: NatsServer) -> None:
    async def scenario() -> None:
        pool = VmAgentPool(_settings(tmp_path, nats.url), mix={"shell": 1}, ready_timeout_s=DEADLINE_S)
        try:
            pool.refill_soon()
            member = await asyncio.wait_for(pool.take("shell"), DEADLINE_S)
            # It said hello on the bus once its agent was warm (nothing listens at a vm_agent).
            assert member.hello is not None and member.hello.warm_agent_state == "ready", member.hello
            assert member.hello.vm_id == member.vm_id
            zygote_pid = pool.zygote._process.pid
            parent, session = _parent_and_session(member.pid)
            assert parent == zygote_pid, "forked by the zygote, not started from scratch"
            assert session == member.pid, "in a session of its own, like a started vm_agent"
            assert Path(f"/proc/{member.pid}/comm").read_text().strip() == "baton-vm_agent"
            # The zygote ends with the provisioner's handle on it; the vm_agent lives on.
            pool.zygote.stop()
            await asyncio.to_thread(wait_for, lambda: pool.zygote._process.poll() is not None,
                                    timeout_s=DEADLINE_S, what="the zygote to exit")
            assert member.alive
            member.kill()
            await asyncio.to_thread(wait_for, lambda: not member.alive, timeout_s=DEADLINE_S,
                                    what="the vm_agent to stop")
        finally:
            _end_all(pool)

    asyncio.run(scenario())


def test_with_the_pool_empty_a_task_waits_for_the_next_warm_vm_agent(tmp_path: Path, nats: NatsServer) -> None:
    async def scenario() -> None:
        pool = VmAgentPool(_settings(tmp_path, nats.url), mix={}, ready_timeout_s=DEADLINE_S)
        try:
            first, second = await asyncio.wait_for(
                asyncio.gather(pool.take("shell"), pool.take("shell")), DEADLINE_S)
            assert first.pid != second.pid, "each taker gets its own vm_agent"
            for member in (first, second):
                assert member.hello is not None and member.hello.warm_agent_state == "ready"
        finally:
            _end_all(pool)

    asyncio.run(scenario())


def test_a_vm_agent_that_cannot_start_fails_the_take_with_its_reason(tmp_path: Path) -> None:
    async def scenario() -> None:
        # A bus nobody answers on: the vm_agent cannot call home. The readiness deadline is short
        # so the take fails after it, not after the default (the reason is what is checked).
        settings = _settings(tmp_path, f"nats://127.0.0.1:{free_port()}")
        pool = VmAgentPool(settings, mix={}, ready_timeout_s=CANNOT_START_DEADLINE_S)
        try:
            with pytest.raises(VmAgentError) as failure:
                await asyncio.wait_for(pool.take("shell"), DEADLINE_S)
            assert str(failure.value), "the reason is given"
        finally:
            pool.stop_idle()
        pids = [int(p.read_text()) for p in pool.pool_dir.glob("*/pid")]
        await asyncio.to_thread(wait_for, lambda: not any(map(process_alive, pids)), timeout_s=DEADLINE_S,
                                what="the vm_agent that did not start to be gone")

    asyncio.run(scenario())


def test_one_vm_agent_serves_a_workspace_and_one_left_unrecorded_is_stopped_before_another(
        tmp_path: Path, nats: NatsServer) -> None:
    """A provisioner that died (or stalled) between assigning a vm_agent and recording it leaves
    that vm_agent serving the task: another vm_agent assigned the same workspace refuses it, and
    the replica that takes the task over stops the first before it assigns its own."""
    async def scenario() -> None:
        settings = _settings(tmp_path, nats.url)
        pool = VmAgentPool(settings, mix={}, ready_timeout_s=DEADLINE_S)
        state_dir, workspace = settings.data_dir / "vm_agents" / "t1", settings.data_dir / "workspaces" / "t1"
        workspace.mkdir(parents=True)

        async def assign(member) -> None:
            await pool.assign(member, task_id="t1", workspace=workspace, state_dir=state_dir)

        try:
            first, second, third = await asyncio.wait_for(
                asyncio.gather(*(pool.take("shell") for _ in range(3))), DEADLINE_S)
            await assign(first)  # ... and its provisioner dies before recording it.
            assert workspace_lock.holder(state_dir) == first.pid

            with pytest.raises(VmAgentError, match=rf"refused the assignment \(409\): another vm_agent "
                                                   rf"\(pid {first.pid}\) serves the workspace of t1"):
                await assign(second)
            assert (await pool.members.ask_alive("t1"))["task_id"] == "t1", "the first still serves it"

            await asyncio.to_thread(stop_unrecorded_vm_agent, state_dir)
            assert not process_alive(first.pid)
            assert workspace_lock.holder(state_dir) is None
            await assign(third)
            assert workspace_lock.holder(state_dir) == third.pid
            assert (await pool.members.ask_alive("t1"))["task_id"] == "t1"
        finally:
            _end_all(pool)

    asyncio.run(scenario())


def test_two_provisioner_replicas_provisioning_one_workspace_at_once_give_it_one_vm_agent(
        tmp_path: Path, nats: NatsServer) -> None:
    """Replicas sharing the data dir may both set out to provision a task's workspace (one took
    the partition over while the other still worked on it): they do it one at a time, the second
    finds the first's vm_agent recorded and uses it; one clone, one vm_agent, both told its address."""
    from services.provisioner.local import LocalProvider
    from tests.support.git_remote import make_origin

    async def scenario() -> None:
        base = _settings(tmp_path, nats.url)
        first, second = (LocalProvider(base.model_copy(update={"replica": (index, 2)}), ready_timeout_s=DEADLINE_S)
                         for index in range(2))
        origin = make_origin(tmp_path).as_uri()
        try:
            urls = await asyncio.wait_for(asyncio.gather(
                first.provision("t1", origin, None, agent="shell"),
                second.provision("t1", origin, None, agent="shell")), DEADLINE_S)
            assert urls[0] == urls[1]
            state_dir = first.vm_agent_dir("t1")
            holder = workspace_lock.holder(state_dir)
            assert holder is not None and holder == int((state_dir / "pid").read_text())
            assert (first.workspace_dir("t1") / "README.md").exists(), "the clone is in the workspace"
            assert (await first.pool.members.ask_alive("t1"))["task_id"] == "t1"
        finally:
            for provider in (first, second):
                _end_all(provider.pool)
            holder = workspace_lock.holder(first.vm_agent_dir("t1"))
            if holder is not None:
                os.killpg(holder, signal.SIGTERM)

    asyncio.run(scenario())
