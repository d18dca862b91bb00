"""What the provisioner does on each event (the map is at the bottom).

Provisioning is slow (a clone, a process start), so the handler only records the request
with its consumer position and returns; the work runs in the background and is resumed
from the store after a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from eventsourcing.persistence import Tracking

from events import Envelope, TaskCancelled, TaskFailed, WorkspaceRequested, parse_event
from services.provisioner.domain import Workspace, all_workspaces
from services.provisioner.local import LocalProvider, ProvisionError
from services.runtime.consumer import Handler
from services.runtime.store import ServiceStore

log = logging.getLogger(__name__)


class ProvisionerHandlers:
    def __init__(
        self,
        store: ServiceStore,
        provider: LocalProvider,
        faults: frozenset[str],
        on_ready: Callable[[str, int], None] = lambda task_id, attempt: None,
    ) -> None:
        self.store = store
        self.on_ready = on_ready
        self.provider = provider
        self.faults = faults
        self._running: dict[str, asyncio.Task[None]] = {}

    async def on_workspace_requested(self, envelope: Envelope, tracking: Tracking) -> None:
        requested = parse_event(envelope)
        assert isinstance(requested, WorkspaceRequested)
        existing = self.store.get_task_aggregate(Workspace, envelope.task_id)
        if existing is not None:
            if requested.attempt > existing.attempt:  # The last one was lost: a new workspace.
                existing.new_attempt(requested.attempt, requested.base_branch, envelope.event_id)
                self.store.save_processed(tracking, existing)
                self.provision_in_background(existing)
            return
        workspace = Workspace(
            envelope.task_id, requested.repo, requested.base_branch, requested.provider,
            envelope.event_id, requested.agent,
        )
        self.store.save_processed(tracking, workspace)
        self.provision_in_background(workspace)

    def provision_in_background(self, workspace: Workspace) -> None:
        if workspace.task_id not in self._running:
            task = asyncio.create_task(self.provision(workspace))
            self._running[workspace.task_id] = task
            task.add_done_callback(lambda _: self._running.pop(workspace.task_id, None))

    async def provision(self, workspace: Workspace) -> None:
        try:
            url = await self.provider.provision(
                workspace.task_id, workspace.repo, workspace.base_branch, agent=workspace.agent,
                attempt=workspace.attempt,
            )
        except ProvisionError as error:
            workspace.failed(str(error))
        else:
            if "workspace_ready" in self.faults:
                log.warning("fault workspace_ready: not announcing workspace %s", workspace.task_id)
                return
            expires_at = self.provider.credential_expires_at(workspace.task_id, attempt=workspace.attempt)
            workspace.ready(workspace_id=workspace.workspace_id, vm_agent_url=url,
                            credential_expires_at=expires_at)
        self.store.save(workspace)
        if workspace.vm_agent_url:
            self.on_ready(workspace.task_id, workspace.attempt)

    def resume_unsettled(self) -> None:
        """After a restart, finish every workspace that was requested but never settled."""
        for workspace in self.unsettled():
            log.info("resuming provisioning of %s", workspace.task_id)
            self.provision_in_background(workspace)

    def unsettled(self) -> list[Workspace]:
        return [w for w in all_workspaces(self.store) if not w.is_settled]

    async def on_task_ended(self, envelope: Envelope, tracking: Tracking) -> None:
        """A failed or cancelled task takes no follow-up: its kept agent home and repo credential go
        (the watcher deletes a home kept later, from a vm_agent that left after this)."""
        workspace = self.store.get_task_aggregate(Workspace, envelope.task_id)
        if workspace is not None and not workspace.task_ended:
            workspace.task_ends()
        self.store.save_processed(tracking, workspace)
        self.provider.forget_task(envelope.task_id)

    def handlers(self) -> dict[str, Handler]:
        return {
            WorkspaceRequested.type: self.on_workspace_requested,
            TaskFailed.type: self.on_task_ended,
            TaskCancelled.type: self.on_task_ended,
        }
