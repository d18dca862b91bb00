"""What the provisioner does on each event (each handler says which: `@handles`).

Provisioning is slow (a clone, a process start, a cloud server's boot), so the handler only
records the request with its consumer position and returns; the work runs in the background on the
task's provider (`local`, `hetzner`, …) and is resumed from the store after a restart. A cloud
workspace is given back (its server deleted, ServerDeleted with its cost) when its task fails or is
cancelled, or once its vm_agent left (remote_watcher.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine

from eventsourcing.persistence import IntegrityError, Tracking

from events import (
    BaseEvent, Envelope, SessionFailed, TaskCancelled, TaskFailed, WorkspaceRequested, parse_event, partition_of,
)
from services.provisioner.domain import Workspace, all_workspaces
from services.provisioner.local import LocalProvider
from services.provisioner.providers import LocalWorkspaces, ProvisionError, WorkspaceOrder, WorkspaceProvider
from services.provisioner.remote import assign_remote_vm_agent
from services.runtime.consumer import Handler
from services.runtime.partitions import HeldPartitions
from services.runtime.handlers import declared_handlers, handles
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore
from services.runtime.vm_agent_commands import task_address

log = logging.getLogger(__name__)


class ProvisionerHandlers:
    def __init__(
        self,
        store: ServiceStore,
        local: LocalProvider,
        faults: frozenset[str],
        on_ready: Callable[[str, int], None] = lambda task_id, attempt: None,
        *,
        settings: Settings | None = None,
        held: HeldPartitions | None = None,
    ) -> None:
        self.store = store
        self.held = held or HeldPartitions()
        self.held.listeners.append(self._partition_changed)
        self.on_ready = on_ready
        self.local = local
        self.settings = settings
        self.faults = faults
        self.providers: dict[str, WorkspaceProvider] = {"local": LocalWorkspaces(local)}
        """By name; the composition root sets every usable one (they record through `record`)."""
        self._running: dict[str, asyncio.Task[None]] = {}
        self._held: dict[str, Workspace] = {}  # The workspaces being provisioned, by task.
        self._background: set[asyncio.Task[None]] = set()
        self._loop_thread = threading.get_ident()
        self._loop: asyncio.AbstractEventLoop | None = None

    def record(self, task_id: str, event: BaseEvent) -> None:
        """A provider's lifecycle event on the task's Workspace (providers call from worker threads:
        it is saved on the event loop, on the very aggregate a provisioning holds)."""
        if threading.get_ident() != self._loop_thread and self._loop is not None:
            self._loop.call_soon_threadsafe(self._record_now, task_id, event)
        else:
            self._record_now(task_id, event)

    def _record_now(self, task_id: str, event: BaseEvent) -> None:
        workspace = self._workspace(task_id)
        if workspace is None:
            log.warning("%s for a task with no workspace (%s)", event.type, task_id)
            return
        workspace.record(event)
        self.store.save(workspace)

    def _workspace(self, task_id: str) -> Workspace | None:
        return self._held.get(task_id) or self.store.get_task_aggregate(Workspace, task_id)

    @handles(WorkspaceRequested)
    async def on_workspace_requested(self, envelope: Envelope, tracking: Tracking) -> None:
        requested = parse_event(envelope)
        assert isinstance(requested, WorkspaceRequested)
        existing = self._workspace(envelope.task_id)
        if existing is not None:
            if requested.attempt > existing.attempt:  # The last one was lost: a new workspace.
                self.release_in_background(existing, reason="its attempt was lost; a new one starts")
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
        self._loop = asyncio.get_running_loop()
        if workspace.task_id not in self._running:
            self._held[workspace.task_id] = workspace
            task = asyncio.create_task(self.provision(workspace))
            self._running[workspace.task_id] = task
            task.add_done_callback(lambda _: self._done_provisioning(workspace.task_id))

    def _done_provisioning(self, task_id: str) -> None:
        self._running.pop(task_id, None)
        self._held.pop(task_id, None)

    async def provision(self, workspace: Workspace) -> None:
        try:
            url, expires_at = await self._place(workspace)
        except ProvisionError as error:
            workspace.failed(str(error))
        else:
            if "workspace_ready" in self.faults:
                log.warning("fault workspace_ready: not announcing workspace %s", workspace.task_id)
                return
            workspace.ready(workspace_id=workspace.workspace_id, vm_agent_url=url,
                            credential_expires_at=expires_at)
        try:
            self.store.save(workspace)
        except IntegrityError:  # Another replica provisioned it (one at a time: local.provisioning) and said so.
            log.info("workspace of %s was recorded by another provisioner first", workspace.task_id)
            return
        if workspace.vm_agent_url and workspace.provider == "local":  # The watcher follows local pids.
            self.on_ready(workspace.task_id, workspace.attempt)

    async def _place(self, workspace: Workspace) -> tuple[str, float | None]:
        """The workspace on its provider: the vm_agent's bus address and its credential's expiry.
        A cloud VM's vm_agent, once it called home, is assigned here and clones itself; if that
        fails its server is deleted."""
        provider = self.providers.get(workspace.provider)
        if provider is None:
            raise ProvisionError(f"provider {workspace.provider!r} is not configured in this provisioner")
        order = WorkspaceOrder(workspace.task_id, workspace.repo, workspace.base_branch, workspace.agent,
                               workspace.attempt)
        placement = await provider.provision(order)
        if placement.vm_agent_url is not None:
            return placement.vm_agent_url, placement.credential_expires_at
        try:
            assert self.settings is not None, "a cloud provider needs the settings (its vm_agents' credentials)"
            repo = self.local.checked_repo(workspace.task_id, workspace.repo)
            expires_at = await assign_remote_vm_agent(self.local.pool.members, self.settings, order, placement, repo)
        except ProvisionError as error:
            await provider.release(workspace.task_id, attempt=workspace.attempt, reason=f"not assigned: {error}")
            raise
        return task_address(workspace.task_id), expires_at

    def resume_unsettled(self, partition: int | None = None) -> None:
        """After a restart, finish every workspace that was requested but never settled (of the
        partitions this replica holds; of one `partition` just taken over)."""
        for workspace in self.unsettled():
            if not self.held.holds_task(workspace.task_id) or workspace.task_id in self._running:
                continue
            if partition is not None and partition_of(workspace.task_id) != partition:
                continue
            log.info("resuming provisioning of %s", workspace.task_id)
            self.provision_in_background(workspace)

    def _partition_changed(self, partition: int, held: bool) -> None:
        """A partition taken over: the workspaces its tasks were waiting for are finished here."""
        if held:
            self.resume_unsettled(partition)

    def unsettled(self) -> list[Workspace]:
        return [w for w in all_workspaces(self.store) if not w.is_settled]

    @handles(TaskFailed, TaskCancelled)
    async def on_task_ended(self, envelope: Envelope, tracking: Tracking) -> None:
        """A failed or cancelled task takes no follow-up: its kept agent home and repo credential go
        (the watcher deletes a home kept later, from a vm_agent that left after this), and a cloud
        workspace's server is deleted."""
        workspace = self._workspace(envelope.task_id)
        if workspace is not None and not workspace.task_ended:
            workspace.task_ends()
        self.store.save_processed(tracking, workspace)
        self.local.forget_task(envelope.task_id)
        if workspace is not None:
            self.release_in_background(workspace, reason=f"the task ended ({envelope.type})")

    def release_remote_workspace(self, task_id: str, attempt: int, reason: str) -> None:
        """A cloud workspace's vm_agent left after its session ended (no follow-up came while it
        lingered): WorkspaceReleased (a follow-up re-provisions) and its server is deleted."""
        workspace = self._workspace(task_id)
        if workspace is None or workspace.attempt != attempt or workspace.released:
            return
        workspace.release(reason)
        workspace.announce_release(reason)
        self.store.save(workspace)
        self.release_in_background(workspace, reason=reason)

    def lose_remote_workspace(self, task_id: str, attempt: int, reason: str) -> None:
        """A cloud workspace's vm_agent is gone mid-run: its session ends as a lost workspace
        (SessionFailed `lost_workspace`, recorded for the vm_agent that cannot) and its server goes."""
        workspace = self._workspace(task_id)
        if workspace is None or workspace.attempt != attempt or workspace.released or workspace.task_ended:
            return
        workspace.release(reason)
        workspace.record(SessionFailed(reason=reason, lost_workspace=True))
        self.store.save(workspace)
        self.release_in_background(workspace, reason=reason)

    def release_in_background(self, workspace: Workspace, *, reason: str) -> None:
        """Give the workspace's current attempt back to its provider (a cloud server is deleted,
        ServerDeleted recorded); a failure is logged and the reaper deletes it later."""
        provider = self.providers.get(workspace.provider)
        if provider is None or workspace.provider == "local":
            return
        self._in_background(self._release(provider, workspace.task_id, workspace.attempt, reason))

    async def _release(self, provider: WorkspaceProvider, task_id: str, attempt: int, reason: str) -> None:
        running, held = self._running.get(task_id), self._held.get(task_id)
        if running is not None and held is not None and held.attempt == attempt:
            running.cancel()  # Ended while its server boots: stop waiting, then delete it.
        try:
            await provider.release(task_id, attempt=attempt, reason=reason)
        except ProvisionError as error:
            log.warning("could not release %s workspace of %s (the reaper retries): %s", provider.name, task_id, error)

    def _in_background(self, work: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def handlers(self) -> dict[str, Handler]:
        """Event type -> handler, as declared next to each (`@handles`)."""
        return declared_handlers(self)
