"""The relay: from a store's notification log to JetStream, at least once, deduplicated to once.

The store is the source of truth. The relay reads notifications after its tracked position,
publishes their envelopes with `Nats-Msg-Id = event_id`, and only after every ack records the
new position. A crash anywhere re-sends from the last recorded position; JetStream's duplicate
window drops what it already has.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from eventsourcing.persistence import Tracking

from events import Envelope
from services.runtime.store import ServiceStore, envelope_of

log = logging.getLogger(__name__)

RELAY_TRACKING = "relay:BATON_EVENTS"


class BatchPublisher(Protocol):
    async def publish_batch(self, envelopes: list[Envelope]) -> None: ...


class Relay:
    """Publishes one store's envelopes to the bus, in notification order."""

    def __init__(self, store: ServiceStore, publisher: BatchPublisher, *, batch_size: int = 500):
        self._store = store
        self._publisher = publisher
        self._batch_size = batch_size
        self._wake = asyncio.Event()
        store.on_recorded(self.wake)
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Thread-safe: ask the relay to look for new events now."""
        if self._loop is None:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def position(self) -> int:
        return self._store.process_recorder.max_tracking_id(RELAY_TRACKING) or 0

    def _next_batch(self) -> tuple[int, list[Envelope]]:
        start = self.position()
        notifications = self._store.process_recorder.select_notifications(
            start, self._batch_size, inclusive_of_start=False
        )
        if not notifications:
            return start, []
        envelopes = [envelope_of(self._store.mapper.to_domain_event(n)) for n in notifications]
        return notifications[-1].id, [e for e in envelopes if e is not None]

    async def drain(self) -> int:
        """Publish everything recorded so far; returns how many envelopes were published."""
        published = 0
        while True:
            last_id, envelopes = self._next_batch()
            if last_id == self.position():
                return published
            if envelopes:
                await self._publisher.publish_batch(envelopes)
            self._store.process_recorder.insert_tracking(Tracking(RELAY_TRACKING, last_id))
            published += len(envelopes)

    async def run(self, *, poll_interval_s: float = 1.0, retry_s: float = 0.5) -> None:
        """Drain whenever woken (and every `poll_interval_s`), until cancelled."""
        self._loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            try:
                await self.drain()
            except Exception as error:  # NATS down, timeouts: the store keeps everything.
                log.warning("relay publish failed, will retry: %s", error)
                await asyncio.sleep(retry_s)
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), poll_interval_s)
            except TimeoutError:
                pass


def pending_envelopes(store: ServiceStore) -> Sequence[Envelope]:
    """What the relay has not yet published (for tests and shutdown checks)."""
    relay_position = store.process_recorder.max_tracking_id(RELAY_TRACKING) or 0
    notifications = store.process_recorder.select_notifications(
        relay_position, 10_000, inclusive_of_start=False
    )
    envelopes = (envelope_of(store.mapper.to_domain_event(n)) for n in notifications)
    return [e for e in envelopes if e is not None]
