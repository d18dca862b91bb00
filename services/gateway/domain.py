"""The Submission aggregate: the gateway's record that a user submitted a task."""

from __future__ import annotations

from eventsourcing.domain import event

from events import FollowUpSubmitted, PermissionAnswerGiven, TaskCancelRequested, TaskSubmitted
from services.runtime.store import TaskAggregate


class Submission(TaskAggregate):
    @event("Received")
    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.submitted: TaskSubmitted | None = None
        self.submitted_at: str | None = None
        self.permission_answers: dict[str, str] = {}
        """request id → the option a person chose (each request is answered once)."""
        self.cancel_requested = False

    def submit(self, submitted: TaskSubmitted, *, actor: str) -> None:
        self.emit(submitted, actor=actor)

    def answer_permission(self, request_id: str, option_id: str, *, actor: str, cause: str | None) -> None:
        """`cause`: the PermissionRequested answered."""
        self.emit(PermissionAnswerGiven(request_id=request_id, option_id=option_id), actor=actor, causation_id=cause)

    def request_cancel(self, *, by: str, reason: str | None) -> None:
        """Record a person's wish to cancel the task (once: a repeated cancel records nothing)."""
        if not self.cancel_requested:
            self.emit(TaskCancelRequested(by=by, reason=reason), actor=by)

    def follow_up(self, prompt: str, *, actor: str) -> None:
        """Record a person's follow-up prompt (each one is its own turn, in the order recorded)."""
        self.emit(FollowUpSubmitted(prompt=prompt), actor=actor)

    def apply(self, envelope) -> None:
        if envelope.type == TaskSubmitted.type:
            self.submitted = TaskSubmitted.model_validate(envelope.data)
            self.submitted_at = envelope.occurred_at.isoformat()
        elif envelope.type == TaskCancelRequested.type:
            self.cancel_requested = True
        elif envelope.type == PermissionAnswerGiven.type:
            self.permission_answers[envelope.data["request_id"]] = envelope.data["option_id"]
