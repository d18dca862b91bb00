"""The Workspace aggregate: one per task, from request to ready or failed; a later attempt's
request (after the workspace was lost) replaces it with the new attempt's."""

from __future__ import annotations

from eventsourcing.domain import event

from events import BaseEvent, Envelope, WorkspaceFailed, WorkspaceReady, WorkspaceReleased
from services.runtime.store import ServiceStore, TaskAggregate

ACTOR = "service:provisioner"


class Workspace(TaskAggregate):
    @event("Requested")
    def __init__(
        self, task_id: str, repo: str, base_branch: str | None, provider: str, cause: str,
        agent: str = "shell",
    ) -> None:
        super().__init__(task_id)
        self.agent = agent
        self.repo = repo
        self.base_branch = base_branch
        self.provider = provider
        self.cause = cause
        self.vm_agent_url: str | None = None
        self.failure: str | None = None
        self.released = False
        self.attempt = 1
        self.task_ended = False

    @event("Reattempted")
    def new_attempt(self, attempt: int, base_branch: str | None, cause: str) -> None:
        """A later attempt of the task needs a workspace: the lost one's place is taken by it."""
        self.attempt = attempt
        self.base_branch = base_branch
        self.cause = cause
        self.vm_agent_url = None
        self.failure = None
        self.released = False

    @property
    def workspace_id(self) -> str:
        suffix = f"-a{self.attempt}" if self.attempt > 1 else ""
        return f"{self.provider}-{self.task_id}{suffix}"

    @property
    def is_settled(self) -> bool:
        return self.vm_agent_url is not None or self.failure is not None

    def ready(self, *, workspace_id: str, vm_agent_url: str, credential_expires_at: float | None = None) -> None:
        event = WorkspaceReady(
            workspace_id=workspace_id, provider=self.provider, vm_agent_url=vm_agent_url,
            credential_expires_at=credential_expires_at,
        )
        self.emit(event, actor=ACTOR, causation_id=self.cause)

    def record(self, event: BaseEvent) -> None:
        """A provider's lifecycle event of this workspace (ServerRequested, ServerCreated,
        VmAgentConnected, ServerDeleted) on the task's record."""
        self.emit(event, actor=ACTOR, causation_id=self.cause)

    def failed(self, reason: str) -> None:
        self.emit(WorkspaceFailed(reason=reason), actor=ACTOR, causation_id=self.cause)

    @event("Released")
    def release(self, note: str) -> None:
        """The workspace's vm_agent is gone and everything it recorded is on the bus."""
        self.released = True

    @event("TaskEnded")
    def task_ends(self) -> None:
        """The task failed or was cancelled: nothing of it is kept for a follow-up."""
        self.task_ended = True

    def announce_release(self, reason: str) -> None:
        """WorkspaceReleased: the vm_agent left after its session ended (not lost mid-run, which its
        SessionFailed says); the task's next follow-up re-provisions."""
        event = WorkspaceReleased(workspace_id=self.workspace_id, attempt=self.attempt, reason=reason)
        self.emit(event, actor=ACTOR, causation_id=self.cause)

    def apply(self, envelope: Envelope) -> None:
        if envelope.type == WorkspaceReady.type:
            self.vm_agent_url = envelope.data["vm_agent_url"]
        elif envelope.type == WorkspaceFailed.type:
            self.failure = envelope.data["reason"]


def all_workspaces(store: ServiceStore) -> list[Workspace]:
    """Every workspace in the provisioner's store (read once at startup)."""
    topic = f"{Workspace.__module__}:{Workspace.__qualname__}.Requested"
    found, start = [], 0
    while batch := store.process_recorder.select_notifications(
        start, 500, topics=[topic], inclusive_of_start=False
    ):
        found += [store.repository.get(n.originator_id) for n in batch]
        start = batch[-1].id
    return found
