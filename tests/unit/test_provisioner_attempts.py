"""The provisioner makes a new workspace for a later attempt of a task whose workspace was lost."""

from __future__ import annotations

import asyncio

from eventsourcing.persistence import Tracking

from events import WorkspaceRequested, envelope_for
from services.provisioner.domain import Workspace
from services.provisioner.handlers import ProvisionerHandlers
from tests.unit.fakes import envelopes_in, popo_store

TASK = "t1"


class FakeProvider:
    def __init__(self) -> None:
        self.provisioned: list[tuple[str | None, int]] = []

    async def provision(self, task_id: str, repo: str, base_branch: str | None, *, agent: str, attempt: int) -> str:
        self.provisioned.append((base_branch, attempt))
        return f"http://vm:{attempt}"

    def credential_expires_at(self, task_id: str, *, attempt: int = 1) -> float | None:
        return None


def requested(attempt: int, base_branch: str) -> object:
    return envelope_for(WorkspaceRequested(repo="file:///r", agent="shell", base_branch=base_branch,
                                           attempt=attempt), task_id=TASK, actor="test")


async def test_a_later_attempts_request_replaces_the_lost_workspace_and_a_repeat_changes_nothing():
    store, provider, ready = popo_store(), FakeProvider(), []
    handlers = ProvisionerHandlers(store, provider, frozenset(), on_ready=lambda t, a: ready.append((t, a)))
    for seq, envelope in enumerate([requested(1, "main"), requested(2, f"baton/{TASK}"),
                                    requested(2, f"baton/{TASK}"), requested(1, "main")], start=1):
        await handlers.on_workspace_requested(envelope, Tracking("provisioner-WorkspaceRequested", seq))
        await asyncio.sleep(0)  # let the background provisioning run
        while handlers._running:
            await asyncio.gather(*handlers._running.values())

    assert provider.provisioned == [("main", 1), (f"baton/{TASK}", 2)]
    assert ready == [(TASK, 1), (TASK, 2)]
    assert [(e.type, e.data["workspace_id"]) for e in envelopes_in(store)] == [
        ("WorkspaceReady", f"local-{TASK}"), ("WorkspaceReady", f"local-{TASK}-a2")]
    rebuilt = store.get_task_aggregate(Workspace, TASK)
    assert (rebuilt.attempt, rebuilt.base_branch, rebuilt.vm_agent_url) == (2, f"baton/{TASK}", "http://vm:2")
