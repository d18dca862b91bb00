"""The task runner's loop that works the checks of late handoffs, outside any consumer's handler.

`on_step_overdue` records what it awaits (LateStepAwaited, with its due times) and returns; this
loop checks at each due time whether the handoff came (LateStepArrived), retries its start between
checks where it can be (LateStepChecked), and fails the task after the last. Each check is read
from, and saved to, the store: a restart, or a replica that takes a partition over, resumes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from eventsourcing.persistence import IntegrityError

from events import PromptDelivered, partition_of
from services.runtime.partitions import HeldPartitions
from services.runtime.store import ServiceStore
from services.task_runner.domain import LateStep, Task

log = logging.getLogger(__name__)

ERROR_PAUSE_S = 1.0
"""A check that failed (its save collided with a handler's, the stream did not answer) is worked again this much later."""


class LateStepActions(Protocol):
    """What a check does, as the task runner's handlers do it."""

    async def came_in_turn(self, task_id: str, step: str, turn: int) -> bool: ...

    async def retry_start(self, task: Task, *, cause: str) -> None: ...

    def save_checked(self, task: Task, *, cause: str) -> None: ...


class LateStepChecks:
    """Keeps when each task's next check is due (the tasks of the partitions held), and works the due ones."""

    def __init__(self, store: ServiceStore, actions: LateStepActions, *, held: HeldPartitions | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store, self.actions, self.clock = store, actions, clock
        self.held = held or HeldPartitions()
        self.held.listeners.append(self._partition_changed)
        self.due: dict[str, float] = {}  # task id -> when its next check is due (epoch seconds)
        self.in_flight: dict[str, asyncio.Task[None]] = {}

    def note(self, task: Task) -> None:
        """Follow a task just saved: its next check, or none (it ended, or awaits nothing)."""
        next_check = task.next_late_check
        if next_check is None:
            self.due.pop(task.task_id, None)
        elif self.held.holds_task(task.task_id):
            self.due[task.task_id] = next_check

    def resume(self) -> None:
        """After a restart (or on taking a partition over), every pending check of the tasks held continues."""
        topic = f"{Task.__module__}:{Task.__qualname__}.LateStepAwaited"
        start, seen = 0, set()
        while batch := self.store.process_recorder.select_notifications(
                start, 500, topics=[topic], inclusive_of_start=False):
            for stored in batch:
                if stored.originator_id not in seen:
                    seen.add(stored.originator_id)
                    task = self.store.repository.get(stored.originator_id)
                    if task.task_id not in self.due:
                        self.note(task)
            start = batch[-1].id

    def _partition_changed(self, partition: int, held: bool) -> None:
        """A partition taken over: its checks are worked here now; one given up: by another replica."""
        if held:
            self.resume()
            return
        for task_id in [t for t in self.due if partition_of(t) == partition]:
            del self.due[task_id]

    async def run(self, interval_s: float = 0.25) -> None:
        """Start each task's due checks (one at a time per task, never in a handler), until cancelled."""
        try:
            while True:
                self.start_due_checks(self.clock())
                await asyncio.sleep(interval_s)
        finally:
            for working in self.in_flight.values():
                working.cancel()

    def start_due_checks(self, now: float) -> list[asyncio.Task[None]]:
        started = []
        for task_id, due_at in list(self.due.items()):
            if due_at <= now and task_id not in self.in_flight and self.held.holds_task(task_id):
                self.in_flight[task_id] = asyncio.create_task(self._work_guarded(task_id, now))
                started.append(self.in_flight[task_id])
        return started

    async def work_due_checks(self, now: float) -> None:
        """Work every check due at `now` and return once they are done (what the loop starts each tick)."""
        await asyncio.gather(*self.start_due_checks(now))

    async def _work_guarded(self, task_id: str, now: float) -> None:
        try:
            await self.work_checks_of(task_id, now)
        except IntegrityError:  # A handler saved the task meanwhile: read it again and check again.
            log.info("check of a late handoff of %s collided with a handler's save; worked again", task_id)
            self.due[task_id] = now + ERROR_PAUSE_S
        except Exception:
            log.exception("check of a late handoff of %s failed; worked again in %.0fs", task_id, ERROR_PAUSE_S)
            self.due[task_id] = now + ERROR_PAUSE_S
        finally:
            self.in_flight.pop(task_id, None)

    async def work_checks_of(self, task_id: str, now: float) -> None:
        """Each of the task's late handoffs due at `now`: arrived, checked again later (its start
        retried where it can be), or, at its last check, the task failed naming it."""
        task = self.store.get_task_aggregate(Task, task_id)
        if task is None:
            self.due.pop(task_id, None)
            return
        due = sorted((late for late in task.late_steps.values() if late.next_due <= now), key=lambda l: l.next_due)
        for late in due:
            if not await self._check(task, late):
                break  # The task failed.
        if due:
            self.actions.save_checked(task, cause=due[0].cause)
        self.note(task)

    async def _check(self, task: Task, late: LateStep) -> bool:
        """One due check of `late`; False when the task failed on it."""
        if await self.actions.came_in_turn(task.task_id, late.expected, late.turn):
            task.late_step_arrived(late.expected)
        elif late.at_last_check:
            task.fail(late.missing_reason(), cause=late.cause)
            return False
        else:
            if late.expected == PromptDelivered.type and task.vm_agent_url:
                await self.actions.retry_start(task, cause=late.cause)
            task.late_step_checked(late.expected)
        return True
