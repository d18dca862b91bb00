"""The fair queue: at most `limit` tasks hold a place at once; the rest wait, first come first served.

One `RunQueue` aggregate per task-runner store records every decision (`Waited`, `Placed`,
`Released`), saved in the same transaction as the Task events and the consumer position that
caused it: a crash before the commit changes nothing (the message is redelivered and the
decision taken again), a crash after it never takes it twice. After a restart the queue is
rebuilt from the store, so positions and places are exactly as they were.
"""

from __future__ import annotations

import uuid

from eventsourcing.domain import Aggregate, event

QUEUE_ID = uuid.UUID("0b5e7c1a-4f43-4d8e-9a61-3c2b9d7f0e11")


class RunQueue(Aggregate):
    """Which tasks hold a place (`running`) and which wait for one (`waiting`, oldest first)."""

    INITIAL_VERSION = 1

    @staticmethod
    def create_id() -> uuid.UUID:
        return QUEUE_ID

    @event("Opened")
    def __init__(self) -> None:
        self.running: list[str] = []
        self.waiting: list[str] = []

    def holds(self, task_id: str) -> bool:
        return task_id in self.running or task_id in self.waiting

    def has_place(self, limit: int) -> bool:
        return len(self.running) < limit

    def position_of(self, task_id: str) -> int | None:
        """1 = the next to get a place; None if it does not wait."""
        return self.waiting.index(task_id) + 1 if task_id in self.waiting else None

    @event("Waited")
    def wait(self, task_id: str) -> None:
        """`task_id` waits for a place, behind every task already waiting."""
        self.waiting.append(task_id)

    @event("Placed")
    def place(self, task_id: str) -> None:
        """`task_id` holds a place from now on (it may start)."""
        if task_id in self.waiting:
            self.waiting.remove(task_id)
        self.running.append(task_id)

    @event("Released")
    def release(self, task_id: str) -> None:
        """`task_id` ended: its place (or its spot in the line) is free."""
        if task_id in self.running:
            self.running.remove(task_id)
        if task_id in self.waiting:
            self.waiting.remove(task_id)

    def next_waiting(self, limit: int) -> str | None:
        """The task that gets the next free place, if a place is free and a task waits."""
        return self.waiting[0] if self.waiting and self.has_place(limit) else None
