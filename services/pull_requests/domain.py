"""The PullRequest aggregate: what the pull-requests service decided for one task's branch."""

from __future__ import annotations

from eventsourcing.domain import event

from events import Envelope, PullRequestFailed, PullRequestOpened, PullRequestUpdated
from services.runtime.store import TaskAggregate

ACTOR = "service:pull-requests"


class PullRequest(TaskAggregate):
    """One per task: its pull request (number, url) once opened, and the turns it told."""

    @event("Begun")
    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.number: int | None = None
        self.url: str | None = None
        self.turns_told: set[int] = set()
        """Turns whose push the pull request records (opened, updated, or failed: decided)."""

    def opened(self, pull: dict, *, head: str, base: str, draft: bool, turn: int, cause: str) -> None:
        self.emit(PullRequestOpened(url=pull["html_url"], number=pull["number"], head=head, base=base,
                                    draft=draft, turn=turn), actor=ACTOR, causation_id=cause)

    def updated(self, *, turn: int, cause: str) -> None:
        assert self.number is not None and self.url is not None
        self.emit(PullRequestUpdated(url=self.url, number=self.number, turn=turn), actor=ACTOR, causation_id=cause)

    def failed(self, reason: str, *, turn: int, cause: str) -> None:
        self.emit(PullRequestFailed(reason=reason, turn=turn), actor=ACTOR, causation_id=cause)

    def apply(self, envelope: Envelope) -> None:
        data = envelope.data
        if envelope.type == PullRequestOpened.type:
            self.number, self.url = data["number"], data["url"]
        self.turns_told.add(data.get("turn", 1))
