"""Follows the vm_agents of cloud workspaces over the bus (no pid to watch on another machine): a VM
whose vm_agent stops answering mid-run is a lost workspace, as a dead local vm_agent is. Its session
ends with SessionFailed `lost_workspace` (the task runner starts a new attempt or fails the task
naming the loss) and its server is deleted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.provisioner.domain import all_workspaces
from services.runtime.store import ServiceStore

log = logging.getLogger(__name__)

Answers = Callable[[str], Awaitable[bool]]
"""Whether the task's vm_agent answers on the bus now (MemberBus.answers)."""
Lose = Callable[[str, int, str], None]
"""(task id, attempt, reason): end the attempt's session as a lost workspace and give it back."""


class RemoteVmAgentWatcher:
    """Asks each running cloud workspace's vm_agent every `every_s` whether it is there; `misses`
    unanswered asks in a row (a reconnect is not a loss) lose the workspace."""

    def __init__(self, store: ServiceStore, answers: Answers, lose: Lose, *, every_s: float = 5.0,
                 misses: int = 3) -> None:
        self.store = store
        self.answers = answers
        self.lose = lose
        self.every_s = every_s
        self.misses = misses
        self._missed: dict[tuple[str, int], int] = {}

    def running(self) -> list[tuple[str, int]]:
        """The (task, attempt) of every cloud workspace whose vm_agent was assigned and still works."""
        return [(w.task_id, w.attempt) for w in all_workspaces(self.store)
                if w.provider != "local" and w.vm_agent_url and not (w.released or w.task_ended or w.failure)]

    async def check_once(self) -> list[tuple[str, int]]:
        """Ask every running one; the ones lost now."""
        running = self.running()
        self._missed = {key: n for key, n in self._missed.items() if key in running}
        lost = []
        for task_id, attempt in running:
            if await self.answers(task_id):
                self._missed.pop((task_id, attempt), None)
                continue
            self._missed[(task_id, attempt)] = missed = self._missed.get((task_id, attempt), 0) + 1
            if missed >= self.misses:
                reason = (f"the cloud workspace's vm_agent stopped answering on the bus "
                          f"({missed} checks, {self.every_s:g} s apart); the run was lost with its server")
                log.warning("task %s attempt %d: %s", task_id, attempt, reason)
                self.lose(task_id, attempt, reason)
                lost.append((task_id, attempt))
        return lost

    async def run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.every_s)
