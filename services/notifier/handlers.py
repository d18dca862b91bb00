"""The notifier's reactions: queue a notification per endpoint for each event it wants (with the
consumer position, one transaction), and a loop of its own that delivers what is due."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from eventsourcing.persistence import Tracking

from events import Envelope, partition_of
from services.notifier.domain import Outbox, Pending, backoff_s
from services.notifier.endpoints import NOTIFIABLE_TYPES, Endpoint
from services.notifier.messages import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    delivery_id,
    encode,
    notification,
    signature,
)
from services.runtime.consumer import Handler, Subscription
from services.runtime.partitions import HeldPartitions
from services.runtime.handlers import declared_handlers, handles
from services.runtime.store import ServiceStore, forgotten_if_unsaved

log = logging.getLogger(__name__)


class Poster(Protocol):
    async def post(self, url: str, payload: bytes, headers: dict[str, str]) -> int:
        """POST `payload`; the response's status. Raises on a connection error or timeout."""


class TaskFacts(Protocol):
    async def submitted(self, task_id: str) -> dict | None:
        """The task's TaskSubmitted fields (its repo without credentials, its permission policy),
        or None if no longer known."""


class Notifier:
    """Keeps one live Outbox per task with pending notifications (the only copy that is saved)."""

    def __init__(self, store: ServiceStore, endpoints: tuple[Endpoint, ...], poster: Poster, facts: TaskFacts,
                 *, public_url: str | None, max_attempts: int, backoff_first_s: float,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 held: HeldPartitions | None = None) -> None:
        self.store, self.poster, self.facts = store, poster, facts
        self.held = held or HeldPartitions()
        self.held.listeners.append(self._partition_changed)
        self.endpoints = {endpoint.name: endpoint for endpoint in endpoints}
        self.public_url, self.max_attempts, self.backoff_first_s = public_url, max_attempts, backoff_first_s
        self.clock = clock
        self.outboxes: dict[str, Outbox] = {}
        self.in_flight: dict[str, asyncio.Task[None]] = {}

    def _partition_changed(self, partition: int, held: bool) -> None:
        """A partition taken over: its pending notifications are worked here now; one given up:
        another replica works them (what is cached here goes stale)."""
        if held:
            self.resume()
            return
        for task_id in [t for t in self.outboxes if partition_of(t) == partition]:
            del self.outboxes[task_id]

    def resume(self) -> None:
        """After a restart, every outbox with pending notifications (of the partitions this
        replica holds) is worked again."""
        topic = f"{Outbox.__module__}:{Outbox.__qualname__}.Opened"
        start = 0
        while batch := self.store.process_recorder.select_notifications(
                start, 500, topics=[topic], inclusive_of_start=False):
            for stored in batch:
                outbox = self.store.repository.get(stored.originator_id)
                if outbox.pending and self.held.holds_task(outbox.task_id) and outbox.task_id not in self.outboxes:
                    self.outboxes[outbox.task_id] = outbox
            start = batch[-1].id

    def outbox_for(self, task_id: str) -> Outbox:
        if task_id not in self.outboxes:
            self.outboxes[task_id] = self.store.get_task_aggregate(Outbox, task_id) or Outbox(task_id)
        return self.outboxes[task_id]

    @handles(*NOTIFIABLE_TYPES)
    async def on_event(self, envelope: Envelope, tracking: Tracking) -> None:
        """Queue one notification per endpoint that wants `envelope`'s type, with its position."""
        wanting = [name for name, endpoint in self.endpoints.items() if endpoint.wants(envelope.type)]
        if not wanting:
            self.store.save_processed(tracking)
            return
        outbox = self.outbox_for(envelope.task_id)
        for name in wanting:
            outbox.queue(delivery_id(envelope.event_id, name), name, envelope.model_dump(mode="json"),
                         self.clock().isoformat())
        with forgotten_if_unsaved(self.outboxes, outbox.task_id):
            self.store.save_processed(tracking, outbox)

    def pending_count(self) -> int:
        return sum(len(outbox.pending) for outbox in self.outboxes.values())

    def handlers(self) -> dict[str, Handler]:
        """Event type -> handler, as declared (`@handles`)."""
        return declared_handlers(self)

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(event_type, handle) for event_type, handle in self.handlers().items()]

    async def run_deliveries(self, interval_s: float = 0.2) -> None:
        """Start each due notification's attempt (one at a time per notification, never in a
        consumer's handler), until cancelled."""
        try:
            while True:
                self.start_due_attempts()
                await asyncio.sleep(interval_s)
        finally:
            for attempt in self.in_flight.values():
                attempt.cancel()

    def start_due_attempts(self) -> None:
        now = self.clock()
        for outbox in list(self.outboxes.values()):
            if not self.held.holds_task(outbox.task_id):
                continue
            for entry in outbox.due(now):
                if entry.delivery_id not in self.in_flight:
                    self.in_flight[entry.delivery_id] = asyncio.create_task(self.attempt(outbox, entry))
            if not outbox.pending:
                self.outboxes.pop(outbox.task_id, None)

    async def attempt(self, outbox: Outbox, entry: Pending) -> None:
        """POST one notification, then record how it went (delivered, to retry, or given up)."""
        try:
            submitted = await self.facts.submitted(entry.about["task_id"]) or {}
            if entry.event_type == "PermissionRequested" and submitted.get("permission_policy") != "ask":
                # Under the `auto` policy the request is answered at once: nobody is waited for.
                outbox.skip(entry.delivery_id, "the task's policy answers its permission requests")
            else:
                self._record(outbox, entry, await self._post(entry, submitted))
            with forgotten_if_unsaved(self.outboxes, outbox.task_id):
                self.store.save(outbox)
        finally:
            self.in_flight.pop(entry.delivery_id, None)

    def _record(self, outbox: Outbox, entry: Pending, error: str | None) -> None:
        if error is None:
            outbox.delivered(entry.delivery_id)
        elif entry.attempts + 1 >= self.max_attempts:
            outbox.given_up(entry.delivery_id, error)
        else:
            retry_at = self.clock() + timedelta(seconds=backoff_s(self.backoff_first_s, entry.attempts + 1))
            outbox.attempt_failed(entry.delivery_id, error, retry_at.isoformat())
        log.info("notification %s of %s %s to %s: %s", entry.delivery_id, entry.event_type, entry.event_id,
                 entry.endpoint, error or "delivered")

    async def _post(self, entry: Pending, submitted: dict) -> str | None:
        """None if the endpoint took it (2xx), else why not (an HTTP status or an error's kind)."""
        endpoint = self.endpoints.get(entry.endpoint)
        if endpoint is None:
            return "endpoint no longer configured"
        envelope = Envelope.model_validate(entry.about)
        body = notification(envelope, repo=submitted.get("repo"), public_url=self.public_url)
        payload = encode(body, form=endpoint.format)
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: entry.delivery_id,
                   EVENT_HEADER: envelope.type, SIGNATURE_HEADER: signature(endpoint.secret.get_secret_value(), payload)}
        try:
            status = await self.poster.post(endpoint.url.get_secret_value(), payload, headers)
        except Exception as error:  # Named by kind: an error's text may carry the URL.
            return f"{type(error).__name__} reaching the endpoint"
        return None if 200 <= status < 300 else f"HTTP {status}"
