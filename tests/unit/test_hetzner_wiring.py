"""The provisioner's wiring of a cloud provider: each workspace on its task's provider, the server
given back when the attempt is replaced or the task ends; a VM whose vm_agent stops answering after
several unanswered asks (not one) is released if its session had ended, else lost (SessionFailed
lost_workspace)."""

from __future__ import annotations

import asyncio

from eventsourcing.persistence import Tracking

from events import TaskFailed, WorkspaceRequested, envelope_for
from services.provisioner.handlers import ProvisionerHandlers
from services.provisioner.providers import Placement, WorkspaceOrder
from services.provisioner.remote_watcher import RemoteVmAgentWatcher
from tests.unit.fakes import envelopes_in, popo_store

TASK = "t1"


class FakeCloud:
    name = "hetzner"

    def __init__(self) -> None:
        self.provisioned: list[int] = []
        self.released: list[tuple[int, str]] = []

    async def provision(self, order: WorkspaceOrder) -> Placement:
        self.provisioned.append(order.attempt)
        return Placement(workspace_id=f"hetzner-{order.task_id}", vm_agent_url=f"nats:vm{order.attempt}")

    async def release(self, task_id: str, *, attempt: int, reason: str) -> None:
        self.released.append((attempt, reason))


def envelope(event: object) -> object:
    return envelope_for(event, task_id=TASK, actor="test")


def requested(attempt: int) -> object:
    return envelope(WorkspaceRequested(repo="file:///r", agent="shell", provider="hetzner", attempt=attempt))


async def settle(handlers: ProvisionerHandlers) -> None:
    for _ in range(5):
        await asyncio.sleep(0)
        await asyncio.gather(*handlers._running.values(), *handlers._background)


class FakeLocal:
    def forget_task(self, task_id: str) -> None:
        """(The local provider's kept agent home and repo credential: none here.)"""


def handlers_on(cloud: FakeCloud) -> ProvisionerHandlers:
    handlers = ProvisionerHandlers(popo_store(), FakeLocal(), frozenset())  # type: ignore[arg-type]
    handlers.providers["hetzner"] = cloud
    return handlers


async def test_a_new_attempt_on_the_cloud_is_provisioned_and_the_lost_attempts_server_given_back():
    cloud = FakeCloud()
    handlers = handlers_on(cloud)
    for seq, event in enumerate([requested(1), requested(2)], start=1):
        await handlers.on_workspace_requested(event, Tracking("provisioner-WorkspaceRequested", seq))
        await settle(handlers)

    assert cloud.provisioned == [1, 2]
    assert [attempt for attempt, _ in cloud.released] == [1]
    assert [e.data["workspace_id"] for e in envelopes_in(handlers.store) if e.type == "WorkspaceReady"] == [
        f"hetzner-{TASK}", f"hetzner-{TASK}-a2"]


async def test_a_failed_task_gives_its_server_back():
    cloud = FakeCloud()
    handlers = handlers_on(cloud)
    await handlers.on_workspace_requested(requested(1), Tracking("provisioner-WorkspaceRequested", 1))
    await settle(handlers)
    await handlers.on_task_ended(envelope(TaskFailed(reason="no")), Tracking("provisioner-TaskFailed", 2))
    await settle(handlers)

    assert cloud.released == [(1, "the task ended (TaskFailed)")]


def watcher_of(handlers: ProvisionerHandlers, answers: list[dict | None]) -> RemoteVmAgentWatcher:
    said = iter(answers)

    async def ask_alive(task_id: str) -> dict | None:
        return next(said)

    return RemoteVmAgentWatcher(handlers.store, ask_alive, release=handlers.release_remote_workspace,
                                lose=handlers.lose_remote_workspace, every_s=5, misses=3)


RUNNING, ENDED = {"task_id": TASK, "session_ended": False}, {"task_id": TASK, "session_ended": True}


async def test_a_vm_that_stops_answering_mid_run_is_lost_after_three_unanswered_asks_in_a_row():
    cloud = FakeCloud()
    handlers = handlers_on(cloud)
    await handlers.on_workspace_requested(requested(1), Tracking("provisioner-WorkspaceRequested", 1))
    await settle(handlers)
    watcher = watcher_of(handlers, [None, None, RUNNING, None, None, None])
    # Two misses, then an answer (a reconnect): not gone; then three in a row: lost.
    assert [await watcher.check_once() for _ in range(5)] == [[], [], [], [], []]
    assert await watcher.check_once() == [(TASK, 1)]
    await settle(handlers)

    types = [e.type for e in envelopes_in(handlers.store)]
    lost = [e for e in envelopes_in(handlers.store) if e.type == "SessionFailed"]
    assert len(lost) == 1 and lost[0].data["lost_workspace"] is True and "WorkspaceReleased" not in types
    assert "stopped answering on the bus (3 checks" in lost[0].data["reason"]
    assert [attempt for attempt, _ in cloud.released] == [1]
    assert await watcher.check_once() == []  # settled: no longer asked


async def test_a_vm_whose_vm_agent_left_after_its_session_ended_is_released_and_its_server_deleted():
    cloud = FakeCloud()
    handlers = handlers_on(cloud)
    await handlers.on_workspace_requested(requested(1), Tracking("provisioner-WorkspaceRequested", 1))
    await settle(handlers)
    watcher = watcher_of(handlers, [RUNNING, ENDED, None, None, None])

    assert [await watcher.check_once() for _ in range(5)] == [[], [], [], [], [(TASK, 1)]]
    await settle(handlers)

    types = [e.type for e in envelopes_in(handlers.store)]
    assert "WorkspaceReleased" in types and "SessionFailed" not in types
    assert [attempt for attempt, _ in cloud.released] == [1]
