"""Follows the vm_agents of cloud workspaces over the bus (no pid to watch on another machine), as
the local watcher follows local ones: a VM's vm_agent exits once its session is over and no
follow-up came for BATON_LINGER_S; once it no longer answers, the workspace is released
(WorkspaceReleased: a follow-up re-provisions) and its server deleted. One that stops answering
mid-run is a lost workspace: its session ends with SessionFailed `lost_workspace` (the task runner
starts a new attempt or fails the task naming the loss) and its server is deleted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.provisioner.domain import all_workspaces
from services.runtime.store import ServiceStore

log = logging.getLogger(__name__)

AskAlive = Callable[[str], Awaitable["dict | None"]]
"""What the task's vm_agent answers to an alive probe (`session_ended`), None if it does not
(MemberBus.ask_alive)."""
Settle = Callable[[str, int, str], None]
"""(task id, attempt, reason): what to do with an attempt whose vm_agent is gone."""


class RemoteVmAgentWatcher:
    """Asks each running cloud workspace's vm_agent every `every_s` whether it is there; after
    `misses` unanswered asks in a row (a reconnect is not a departure) it is gone: `release` if its
    session had ended when it last answered, else `lose`. `every_s` must be shorter than the
    vm_agent's linger, or a departure after a quick session looks like a loss (main.py sees to it)."""

    def __init__(self, store: ServiceStore, ask_alive: AskAlive, *, release: Settle, lose: Settle,
                 every_s: float = 5.0, misses: int = 3) -> None:
        self.store = store
        self.ask_alive = ask_alive
        self.release = release
        self.lose = lose
        self.every_s = every_s
        self.misses = misses
        self._missed: dict[tuple[str, int], int] = {}
        self._ended: dict[tuple[str, int], bool] = {}

    def running(self) -> list[tuple[str, int]]:
        """The (task, attempt) of every cloud workspace whose vm_agent was assigned and still works."""
        return [(w.task_id, w.attempt) for w in all_workspaces(self.store)
                if w.provider != "local" and w.vm_agent_url and not (w.released or w.task_ended or w.failure)]

    async def check_once(self) -> list[tuple[str, int]]:
        """Ask every running one; the ones found gone now (released or lost)."""
        running = self.running()
        self._missed = {key: n for key, n in self._missed.items() if key in running}
        self._ended = {key: ended for key, ended in self._ended.items() if key in running}
        gone = []
        for key in running:
            said = await self.ask_alive(key[0])
            if said is not None:
                self._missed.pop(key, None)
                self._ended[key] = bool(said.get("session_ended"))
                continue
            self._missed[key] = self._missed.get(key, 0) + 1
            if self._missed[key] >= self.misses:
                self._settle(*key)
                gone.append(key)
        return gone

    def _settle(self, task_id: str, attempt: int) -> None:
        checks = f"{self.misses} checks, {self.every_s:g} s apart"
        if self._ended.get((task_id, attempt)):
            self.release(task_id, attempt, f"the vm_agent left after its session ended ({checks}); its server goes")
            return
        reason = f"the cloud workspace's vm_agent stopped answering on the bus ({checks}); the run was lost with its server"
        log.warning("task %s attempt %d: %s", task_id, attempt, reason)
        self.lose(task_id, attempt, reason)

    async def run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.every_s)
