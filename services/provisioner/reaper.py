"""Never a leaked server: at start and periodically, delete every machine of this install that no
live task attempt owns (including one a provisioner killed mid-creation left behind: it carries
its labels from the create call on)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from services.provisioner.domain import all_workspaces
from services.provisioner.providers import OwnedMachine, ProvisionError, WorkspaceProvider
from services.runtime.store import ServiceStore

log = logging.getLogger(__name__)

LiveAttempts = Callable[[], set[tuple[str, int]]]
"""The (task id, attempt) pairs whose workspace is wanted now (requested or running, not released)."""


class Reaper:
    """Deletes the machines of `provider` that `live_attempts()` does not name."""

    def __init__(self, provider: WorkspaceProvider, live_attempts: LiveAttempts, *, every_s: float) -> None:
        self.provider = provider
        self.live_attempts = live_attempts
        self.every_s = every_s

    async def reap_once(self) -> list[OwnedMachine]:
        """Delete every unowned machine now; the ones deleted. A failed delete is logged and
        retried on the next round (the machine is still listed then)."""
        live = self.live_attempts()
        reaped = []
        for machine in await self.provider.owned_machines():
            if (machine.task_id, machine.attempt) in live:
                continue
            try:
                await self.provider.delete_machine(machine, reason=_why(machine))
            except ProvisionError as error:
                log.warning("reaper: could not delete %s server %s: %s", self.provider.name, machine.machine_id, error)
                continue
            reaped.append(machine)
        return reaped

    async def run(self) -> None:
        """Reap now, then every `every_s` seconds, until cancelled."""
        while True:
            try:
                reaped = await self.reap_once()
            except ProvisionError as error:  # Listing failed (the API, the token): next round.
                log.warning("reaper: could not list %s servers: %s", self.provider.name, error)
            else:
                if reaped:
                    log.info("reaper: deleted %d %s server(s) no live task owns", len(reaped), self.provider.name)
            await asyncio.sleep(self.every_s)


def live_attempts_in(store: ServiceStore, provider: str) -> LiveAttempts:
    """The live attempts on `provider` as the provisioner's store records them: the latest attempt of
    each task whose workspace neither failed nor was released, and whose task did not end."""
    def live() -> set[tuple[str, int]]:
        return {(w.task_id, w.attempt) for w in all_workspaces(store)
                if w.provider == provider and not (w.failure or w.released or w.task_ended)}
    return live


def _why(machine: OwnedMachine) -> str:
    if machine.task_id is None:
        return "reaped: labelled for this install but for no task"
    return f"reaped: no live attempt {machine.attempt} of task {machine.task_id} owns it"
