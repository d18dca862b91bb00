"""Watches the vm_agents the local provider started: a vm_agent that is gone never leaves a task hanging.

When a vm_agent process has exited, for whatever reason, the watcher keeps its agent home aside
(the next vm_agent of the task gets a copy: its agent's sessions can be loaded), opens its store,
ends a session it left unfinished with `SessionFailed` (`lost_workspace`, the reason names the lost
vm_agent: the task runner starts a new attempt), relays everything it had not yet published, and
releases the workspace (WorkspaceReleased, unless the session was lost: a later follow-up then
re-provisions). Each attempt of a task has its own vm_agent; the watcher follows the latest.

Replicas: a provisioner judges only the vm_agents started on its own machine (in its own pid
namespace: `vm_agents.this_machine`, recorded beside the pid); another machine's are that
machine's to watch. Two replicas on one machine take turns settling one (a file lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

from services.provisioner.domain import Workspace, all_workspaces
from services.provisioner.local import LocalProvider
from services.provisioner.members import process_alive, this_machine
from services.runtime.bus import vm_agent_dead_letter_subject
from services.runtime.relay import BatchPublisher, Relay
from services.runtime.store import ServiceStore
from vm_agent.state import end_unfinished_session, open_vm_agent_store

log = logging.getLogger(__name__)


class VmAgentWatcher:
    def __init__(self, store: ServiceStore, provider: LocalProvider, publisher: BatchPublisher) -> None:
        self.store = store
        self.provider = provider
        self.publisher = publisher
        self._watched: dict[str, int] = {}  # task id → the attempt whose vm_agent is watched

    def watch(self, task_id: str, attempt: int = 1) -> None:
        self._watched[task_id] = attempt

    async def run(self, *, interval_s: float = 1.0) -> None:
        for workspace in all_workspaces(self.store):
            if workspace.vm_agent_url and not workspace.released:
                self.watch(workspace.task_id, workspace.attempt)
        while True:
            for task_id, attempt in sorted(self._watched.items()):
                if not self._lost_here(task_id, attempt):
                    continue
                with _alone_in(self.provider.vm_agent_dir(task_id, attempt=attempt)) as alone:
                    if alone:  # Else another replica on this machine is settling it.
                        await self.settle_lost_vm_agent(task_id, attempt)
            await asyncio.sleep(interval_s)

    def _lost_here(self, task_id: str, attempt: int) -> bool:
        """The vm_agent was started on this machine and is gone. One started elsewhere (its state
        dir is on another machine, or records another machine) is not judged here."""
        state_dir = self.provider.vm_agent_dir(task_id, attempt=attempt)
        if not state_dir.is_dir():
            return False
        try:
            if (state_dir / "machine").read_text().strip() != this_machine():
                return False
        except FileNotFoundError:
            pass  # Started before machines were recorded: by this one.
        return not self._vm_agent_alive(task_id, attempt)

    def _vm_agent_alive(self, task_id: str, attempt: int) -> bool:
        pid_file = self.provider.vm_agent_dir(task_id, attempt=attempt) / "pid"
        try:
            return process_alive(int(pid_file.read_text()))
        except (OSError, ValueError):
            return False

    async def settle_lost_vm_agent(self, task_id: str, attempt: int = 1) -> None:
        state_dir = self.provider.vm_agent_dir(task_id, attempt=attempt)
        # Before anything is relayed: a new attempt's workspace (asked for once the relayed
        # SessionFailed is handled) finds the home kept.
        try:
            await asyncio.to_thread(self.provider.keep_agent_home, task_id, attempt=attempt)
        except OSError as error:  # Its next session then starts new (AgentSessionStarted says so).
            log.warning("could not keep the agent home of %s (attempt %d): %s", task_id, attempt, error)
        vm_store = open_vm_agent_store(state_dir)
        try:
            # Rebuilding a long session replays every output: off the event loop.
            if lost := await asyncio.to_thread(
                end_unfinished_session, vm_store, task_id,
                reason="the workspace's vm_agent exited while the agent was running; the run was lost",
            ):
                log.warning("vm_agent of task %s (attempt %d) died mid-run; session ended", task_id, attempt)
            await Relay(vm_store, self.publisher,
                        dead_letter_subject=vm_agent_dead_letter_subject(task_id)).drain()
        finally:
            vm_store.close()
        # Read now, not before the relay: its SessionFailed may already have brought a new
        # attempt's request, and that attempt's workspace is not this one to release.
        workspace = self.store.get_task_aggregate(Workspace, task_id)
        if workspace.attempt == attempt and not workspace.released:
            workspace.release("vm_agent gone; its events are relayed")
            if not lost:
                workspace.announce_release("the vm_agent exited after the task's session ended "
                                           "(idle past BATON_LINGER_S, or the task ended)")
            self.store.save(workspace)
        if workspace.task_ended:  # Failed or cancelled meanwhile: the home just kept is not needed.
            self.provider.forget_task(task_id)
        if self._watched.get(task_id) == attempt:
            del self._watched[task_id]


@contextlib.contextmanager
def _alone_in(state_dir: Path) -> Iterator[bool]:
    """True while this process holds `state_dir`'s settle lock (False: another holds it)."""
    with (state_dir / "settle.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
