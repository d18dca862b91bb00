"""What a vm_agent process holds: its assignment (task, workspace, store, relay) and a warm agent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.relay import BatchPublisher, Relay
from services.runtime.store import ServiceStore, sqlite_env
from vm_agent.acp_session import AgentProcess
from vm_agent.domain import Session

log = logging.getLogger(__name__)


def open_vm_agent_store(state_dir: Path) -> ServiceStore:
    """The vm_agent's own store lives beside its workspace (on the VM), so it is always SQLite."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return ServiceStore("vm_agent", sqlite_env(state_dir / "events.sqlite"))


def end_unfinished_session(store: ServiceStore, task_id: str, *, reason: str) -> bool:
    """End a session a dead vm_agent process left unfinished with `reason`; True if there was one."""
    last = store.last_envelope(Session, task_id)
    if last is not None and Session.ends(last):
        return False  # The usual case, told without replaying every output of the session.
    session = store.get_task_aggregate(Session, task_id)
    if session is None or session.ended:
        return False
    session.failed(reason)
    store.save(session)
    return True


@dataclass
class Assigned:
    task_id: str
    workspace: Path
    token: str
    store: ServiceStore
    relay: asyncio.Task[None]
    session: Session | None = None


@dataclass
class VmAgent:
    pool_token: str
    publisher: BatchPublisher
    faults: frozenset[str]
    warm_backend: str | None = None
    warming: Awaitable[AgentProcess] | None = None
    assigned: Assigned | None = None
    runs: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    @property
    def token(self) -> str:
        return self.assigned.token if self.assigned else self.pool_token

    def assign(self, task_id: str, workspace: Path, state_dir: Path, token: str) -> None:
        store = open_vm_agent_store(state_dir)
        end_unfinished_session(
            store, task_id, reason="the vm_agent restarted while the agent was running; the run was lost"
        )
        relay = asyncio.get_running_loop().create_task(Relay(store, self.publisher).run())
        existing = store.get_task_aggregate(Session, task_id)
        self.assigned = Assigned(task_id, workspace, token, store, relay, existing)
        log.info("assigned to task %s in %s", task_id, workspace)

    def session(self) -> Session | None:
        """The task's session: the live object the runner records into (never rebuilt per call,
        which would replay every output event)."""
        return self.assigned.session if self.assigned else None

    def open_session(self, attempt_id: str, agent: str, cause: str | None) -> Session:
        assert self.assigned is not None
        session = Session(self.assigned.task_id, attempt_id, agent, cause)
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

    def take_warm_agent(self, backend: str) -> Awaitable[AgentProcess] | None:
        """The agent started ahead of time, if it is of the kind asked for (used once)."""
        if backend != self.warm_backend or self.warming is None:
            return None
        warming, self.warming = self.warming, None
        return warming
