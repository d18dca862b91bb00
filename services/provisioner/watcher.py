"""Watches the vm_agents the local provider started: a vm_agent that is gone never leaves a task hanging.

When a vm_agent process has exited, for whatever reason, the watcher opens its store, ends a
session it left unfinished with `SessionFailed` (the reason names the lost vm_agent), relays
everything it had not yet published, and releases the workspace.
"""

from __future__ import annotations

import asyncio
import logging

from services.provisioner.domain import Workspace, all_workspaces
from services.provisioner.local import LocalProvider
from services.provisioner.vm_agents import process_alive
from services.runtime.bus import vm_agent_dead_letter_subject
from services.runtime.relay import BatchPublisher, Relay
from services.runtime.store import ServiceStore
from vm_agent.main import end_unfinished_session, open_vm_agent_store

log = logging.getLogger(__name__)


class VmAgentWatcher:
    def __init__(self, store: ServiceStore, provider: LocalProvider, publisher: BatchPublisher) -> None:
        self.store = store
        self.provider = provider
        self.publisher = publisher
        self._watched: set[str] = set()

    def watch(self, task_id: str) -> None:
        self._watched.add(task_id)

    async def run(self, *, interval_s: float = 1.0) -> None:
        for workspace in all_workspaces(self.store):
            if workspace.vm_agent_url and not workspace.released:
                self.watch(workspace.task_id)
        while True:
            for task_id in sorted(self._watched):
                if not self._vm_agent_alive(task_id):
                    await self.settle_lost_vm_agent(task_id)
            await asyncio.sleep(interval_s)

    def _vm_agent_alive(self, task_id: str) -> bool:
        pid_file = self.provider.vm_agent_dir(task_id) / "pid"
        try:
            return process_alive(int(pid_file.read_text()))
        except (OSError, ValueError):
            return False

    async def settle_lost_vm_agent(self, task_id: str) -> None:
        workspace = self.store.get_task_aggregate(Workspace, task_id)
        state_dir = self.provider.vm_agent_dir(task_id)
        vm_store = open_vm_agent_store(state_dir)
        try:
            # Rebuilding a long session replays every output: off the event loop.
            if await asyncio.to_thread(
                end_unfinished_session, vm_store, workspace.task_id,
                reason="the workspace's vm_agent exited while the agent was running; the run was lost",
            ):
                log.warning("vm_agent of task %s died mid-run; session ended", workspace.task_id)
            await Relay(vm_store, self.publisher,
                        dead_letter_subject=vm_agent_dead_letter_subject(task_id)).drain()
        finally:
            vm_store.close()
        workspace.release("vm_agent gone; its events are relayed")
        self.store.save(workspace)
        self._watched.discard(task_id)
