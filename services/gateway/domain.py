"""The Submission aggregate: the gateway's record that a user submitted a task."""

from __future__ import annotations

from eventsourcing.domain import event

from events import TaskSubmitted
from services.runtime.store import TaskAggregate


class Submission(TaskAggregate):
    @event("Received")
    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.submitted: TaskSubmitted | None = None
        self.submitted_at: str | None = None

    def submit(self, submitted: TaskSubmitted, *, actor: str) -> None:
        self.emit(submitted, actor=actor)

    def apply(self, envelope) -> None:
        if envelope.type == TaskSubmitted.type:
            self.submitted = TaskSubmitted.model_validate(envelope.data)
            self.submitted_at = envelope.occurred_at.isoformat()
