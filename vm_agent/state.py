"""What a vm_agent process holds: its assignment (task, workspace, store, relay) and a warm agent."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from services.runtime.bus import vm_agent_dead_letter_subject
from services.runtime.git_safety import vm_agent_git_dir
from services.runtime.relay import BatchPublisher, Relay
from services.runtime.relay_lease import FileLease
from services.runtime.repo_url import RepoCredential
from services.runtime.store import ServiceStore, sqlite_env
from vm_agent import workspace_lock
from vm_agent.domain import Session
from vm_agent.gitops import PushAccess
from vm_agent.permissions import DEFAULT_TIMEOUT_S, PermissionDesk

if TYPE_CHECKING:  # (the ACP client is not needed to read or end a vm_agent's session)
    from vm_agent.acp_session import AgentProcess
    from vm_agent.runner import AgentLauncher

log = logging.getLogger(__name__)


def open_vm_agent_store(state_dir: Path) -> ServiceStore:
    """The vm_agent's own store lives beside its workspace (on the VM), so it is always SQLite."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return ServiceStore("vm_agent", sqlite_env(state_dir / "events.sqlite"))


def directory_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the directory at `path` (it follows renames), None if there is none."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def end_unfinished_session(store: ServiceStore, task_id: str, *, reason: str) -> bool:
    """End a session a dead vm_agent process left unfinished with `reason`, said to be a lost
    workspace (the task runner tries again); True if there was one."""
    last = store.last_envelope(Session, task_id)
    if last is not None and Session.ends(last):
        return False  # The usual case, told without replaying every output of the session.
    session = store.get_task_aggregate(Session, task_id)
    if session is None or session.ended:
        return False
    session.failed(reason, lost_workspace=True)
    store.save(session)
    return True


BusConnector = Callable[[str, "str | None"], Awaitable[BatchPublisher]]
"""(task_id, NATS credentials text or None) -> a connected publisher for the task's events."""


@dataclass
class Assigned:
    task_id: str
    workspace: Path
    credential_expires_at: float
    store: ServiceStore
    relay: asyncio.Task[None]
    session: Session | None = None
    push_access: PushAccess | None = None


@dataclass
class VmAgent:
    """A vm_agent talks to NATS only once assigned, with the credential of its task's workspace
    (it may publish that task's vm_agent events and nothing else)."""

    debug_token: str
    """The bearer token of the debugging HTTP API (BATON_VM_AGENT_TOKEN; empty: no such API)."""
    connect: BusConnector
    faults: frozenset[str]
    launcher: AgentLauncher
    warm_backend: str | None = None
    warming: Awaitable[AgentProcess] | None = None
    warm_workspace: tuple[int, int] | None = None
    """(device, inode) of the directory the warm agent works in: its task's workspace only once
    the provisioner moved the clone there."""
    assigned: Assigned | None = None
    runs: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    publisher: BatchPublisher | None = None
    permission_timeout_s: float = DEFAULT_TIMEOUT_S
    permissions: PermissionDesk | None = None
    """The session's open permission requests, when its task's policy is `ask`."""
    workspace_lease: FileLease | None = None
    """Its hold on its assigned state dir: one vm_agent per workspace (vm_agent/workspace_lock.py)."""

    @property
    def credential_expired(self) -> bool:
        """Its task's bus credential expired (it can no longer hear or publish anything)."""
        return self.assigned is not None and time.time() >= self.assigned.credential_expires_at

    async def assign(self, task_id: str, workspace: Path, state_dir: Path, *,
                     credential_expires_at: float, nats_credentials: str | None,
                     repo_credential: RepoCredential | None = None) -> None:
        lease = workspace_lock.hold(state_dir)  # WorkspaceTaken: another vm_agent serves it.
        try:
            self.publisher = await self.connect(task_id, nats_credentials)
        except BaseException:
            lease.release()
            raise
        self.workspace_lease = lease  # Kept for this process's life.
        store = open_vm_agent_store(state_dir)
        end_unfinished_session(
            store, task_id, reason="the vm_agent restarted while the agent was running; the run was lost"
        )
        # No relay lease: only this process records in its store while it runs (it holds the state
        # dir's lease for its whole life), and each record wakes the relay; its poll is a rare
        # safety net (a lingering vm_agent stays idle).
        relay = asyncio.get_running_loop().create_task(Relay(
            store, self.publisher, dead_letter_subject=vm_agent_dead_letter_subject(task_id),
            on_dead_letter=self._end_session_for_lost_event, lease=None).run(poll_interval_s=10.0))
        existing = store.get_task_aggregate(Session, task_id)
        self.assigned = Assigned(task_id, workspace, credential_expires_at, store, relay, existing)
        # The provisioner copies the clone's git dir there once the clone is done.
        self.assigned.push_access = PushAccess(vm_agent_git_dir(state_dir), repo_credential)
        log.info("assigned to task %s in %s", task_id, workspace)

    def _end_session_for_lost_event(self, task_id: str, event_type: str, reason: str) -> None:
        """An event of the session can never reach the bus: the task must not wait for it
        forever. The session ends with the reason (a small SessionFailed the bus does take)."""
        session = self.session()
        if session is not None and not session.ended and self.assigned is not None:
            session.failed(f"the vm_agent could not publish its {event_type} event: {reason}")
            self.assigned.store.save(session)

    def session(self) -> Session | None:
        """The task's session: the live object the runner records into (never rebuilt per call,
        which would replay every output event)."""
        return self.assigned.session if self.assigned else None

    def open_session(self, attempt_id: str, agent: str, cause: str | None, *, turn: int = 1) -> Session:
        assert self.assigned is not None
        session = Session(self.assigned.task_id, attempt_id, agent, cause, turn)
        self.assigned.store.save(session)
        self.assigned.session = session
        return session

    @property
    def warm_agent_state(self) -> str:
        """none (no agent warmed), starting, ready, failed, or used (handed to the session)."""
        if self.warm_backend is None:
            return "none"
        if self.warming is None:
            return "used"
        if not isinstance(self.warming, asyncio.Future) or not self.warming.done():
            return "starting"
        return "failed" if self.warming.cancelled() or self.warming.exception() else "ready"

    def take_warm_agent(self, backend: str, workspace: Path) -> Awaitable[AgentProcess] | None:
        """The agent started ahead of time, if it is of the kind asked for and works in
        `workspace` (used once)."""
        if backend != self.warm_backend or self.warming is None:
            return None
        if self.warm_workspace != directory_identity(workspace):
            log.warning("the warm agent works elsewhere than %s; starting one there", workspace)
            return None
        warming, self.warming = self.warming, None
        return warming
