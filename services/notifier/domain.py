"""The Outbox aggregate: one task's notifications waiting to be delivered, and how each went.

An entry is queued in the same transaction as the consumer position of the event it is about,
so each event is queued once per endpoint, across restarts. The delivery loop then records each
attempt here, and the outcome as NotificationDelivered or NotificationFailed (on the bus).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from eventsourcing.domain import event

from events import Envelope, NotificationDelivered, NotificationFailed
from services.runtime.store import TaskAggregate

ACTOR = "service:notifier"
MAX_BACKOFF_S = 600.0


@dataclass
class Pending:
    """One notification of one event to one endpoint, not yet settled."""

    delivery_id: str
    endpoint: str
    about: dict
    """The JSON dict of the envelope notified of (not named `envelope`: the relay would publish it)."""
    attempts: int = 0
    due_at: str = ""
    last_error: str | None = None

    @property
    def event_id(self) -> str:
        return self.about["event_id"]

    @property
    def event_type(self) -> str:
        return self.about["type"]


class Outbox(TaskAggregate):
    @event("Opened")
    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.pending: dict[str, Pending] = {}
        self.settled: set[str] = set()

    @event("Queued")
    def queue(self, delivery_id: str, endpoint: str, about: dict, due_at: str) -> None:
        """Notify `endpoint` of envelope `about` (its JSON dict) from `due_at` on; once per delivery id.
        (Not an argument named `envelope`: the store and relay take that for one of ours to publish.)"""
        if delivery_id not in self.pending and delivery_id not in self.settled:
            self.pending[delivery_id] = Pending(delivery_id, endpoint, about, due_at=due_at)

    @event("AttemptFailed")
    def attempt_failed(self, delivery_id: str, error: str, retry_at: str) -> None:
        """An attempt failed with `error` (no URL, no secret); the next one is due at `retry_at`."""
        entry = self.pending[delivery_id]
        entry.attempts, entry.last_error, entry.due_at = entry.attempts + 1, error, retry_at

    @event("Skipped")
    def skip(self, delivery_id: str, why: str) -> None:
        """Not news for anyone (`why`): settled without a POST or an event on the bus."""
        self.pending.pop(delivery_id, None)
        self.settled.add(delivery_id)

    def delivered(self, delivery_id: str) -> None:
        """The endpoint took the notification (2xx) at this attempt: NotificationDelivered."""
        entry = self.pending[delivery_id]
        done = NotificationDelivered(endpoint=entry.endpoint, event_id=entry.event_id, event_type=entry.event_type,
                                     delivery_id=delivery_id, attempts=entry.attempts + 1)
        self.emit(done, actor=ACTOR, causation_id=entry.event_id)

    def given_up(self, delivery_id: str, reason: str) -> None:
        """The last attempt failed with `reason`: NotificationFailed, and no more attempts."""
        entry = self.pending[delivery_id]
        failed = NotificationFailed(endpoint=entry.endpoint, event_id=entry.event_id, event_type=entry.event_type,
                                    delivery_id=delivery_id, attempts=entry.attempts + 1, reason=reason)
        self.emit(failed, actor=ACTOR, causation_id=entry.event_id)

    def due(self, now: datetime) -> list[Pending]:
        return [entry for entry in self.pending.values() if datetime.fromisoformat(entry.due_at) <= now]

    def apply(self, envelope: Envelope) -> None:
        if envelope.type in (NotificationDelivered.type, NotificationFailed.type):
            delivery_id = envelope.data["delivery_id"]
            self.pending.pop(delivery_id, None)
            self.settled.add(delivery_id)


def backoff_s(first_s: float, failed_attempts: int) -> float:
    """The wait after the `failed_attempts`-th failure: first_s, doubled each time, at most 10 min."""
    return min(first_s * 2 ** (failed_attempts - 1), MAX_BACKOFF_S)
