"""The relay: from a store's notification log to JetStream, at least once, deduplicated to once.

The store is the source of truth. The relay publishes the envelopes recorded after its tracked
position with `Nats-Msg-Id = event_id`, and only after every ack records the new position. A
crash anywhere re-sends from the last recorded position; JetStream's duplicate window drops what
it already has.

What was just committed is published from memory: the store hands the relay each commit's
events with their notification ids (`ServiceStore.on_recorded`), so a busy producer does not
read back and decode what it has just written. The notification log stays the source whenever
memory is not exactly the next notifications after the position: after a restart, when the
events in memory do not follow the position without a gap, or when too many piled up.

An event the bus will never take (bigger than its max payload, on a subject this producer may
not publish to: `Unpublishable`) never holds up the ones after it: the relay dead-letters a small
record of it (event id, type, task, size, reason; not the event itself) and records its position
past it. A transient failure (NATS down, a timeout) is retried from the last position.

Replicas of a service share its store, and one relay at a time publishes it: the one holding
the store's lease (`relay_lease`). The others wait to take over when it goes. The holder also
publishes what the other replicas recorded: not in its memory, it is read from the log on a
short poll (`others_poll_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from eventsourcing.persistence import IntegrityError, Recording, Tracking

from events import Envelope, subject_for
from services.runtime.bus import Outgoing, Unpublishable, relay_dead_letter_subject
from services.runtime.relay_lease import RelayLease, lease_for
from services.runtime.store import ServiceStore, envelope_of

log = logging.getLogger(__name__)

RELAY_TRACKING = "relay:BATON_EVENTS"

MEMORY_LIMIT = 20_000
"""Recorded events kept in memory for publishing at most; past that (NATS down), the log."""

BATCH_MAX_BYTES = 8 * 1024 * 1024
"""Payload bytes one round trip carries at most (many 64 KiB output pieces must not make one
batch too slow for its ack deadline)."""

LEASE_CHECK_S = 1.0
"""How often the holder checks it still holds the store's lease (a PostgreSQL round trip)."""
LEASE_RETRY_S = 0.5
"""How often a replica that does not hold the lease tries to take it."""

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class BatchPublisher(Protocol):
    async def publish_batch(self, messages: Sequence[Outgoing]) -> None:
        """Publish in order; raises Unpublishable for the first message the bus will never take."""

    async def publish_dead_letter(self, subject: str, body: dict[str, Any], *, msg_id: str) -> None: ...


_STORED_START = b'{"timestamp":'
_STORED_ENVELOPE = b',"envelope":{"event_id":'


def outgoing_of(domain_event: object, stored_state: bytes | None = None) -> Outgoing | None:
    """The bus message a stored domain event carries (its envelope's JSON as stored), or None
    for internal events. The same JSON as `Envelope.to_json()` of that envelope.

    `stored_state`, the event's stored bytes when at hand, already holds that JSON (the
    envelope is the last field of a `TaskAggregate.Recorded`, written with the same compact
    encoding): it is cut out instead of encoded again."""
    payload: dict[str, Any] | None = getattr(domain_event, "envelope", None)
    if payload is None:
        return None
    body = None
    if isinstance(stored_state, bytes) and stored_state.startswith(_STORED_START) and stored_state.endswith(b"}}"):
        at = stored_state.find(_STORED_ENVELOPE)
        if at > 0:
            body = stored_state[at + 12:-1]  # From `{"event_id":` to the envelope's closing brace.
    return Outgoing(subject_for(payload["task_id"], payload["type"]), payload["event_id"],
                    body if body is not None else _encode(payload).encode())


class Relay:
    """Publishes one store's envelopes to the bus, in notification order."""

    def __init__(self, store: ServiceStore, publisher: BatchPublisher, *, batch_size: int = 2000,
                 dead_letter_subject: str | None = None,
                 on_dead_letter: Callable[[str, str, str], None] | None = None,
                 lease: RelayLease | None | Literal["of the store"] = "of the store"):
        """`on_dead_letter(task_id, event_type, reason)` is told of each event set aside, so its
        producer can end what depended on it with a reason (a vm_agent: its session). `lease`:
        what `run` must hold to publish (default: the store's own, `relay_lease.lease_for`);
        None: always publish (a store no other process opens)."""
        self._store = store
        self._lease = lease_for(store.env) if lease == "of the store" else lease
        self.holding = self._lease is None
        """Whether this relay publishes now (holds the lease); the others' `run` waits to."""
        self._lease_checked_at = 0.0
        self._taking: asyncio.Future[bool] | None = None
        self._on_dead_letter = on_dead_letter
        self._publisher = publisher
        self._batch_size = batch_size
        self._dead_letter_subject = dead_letter_subject or relay_dead_letter_subject(store.name)
        self.dead_lettered = 0
        """Events set aside because the bus will never take them (since this relay started)."""
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._recent: deque[tuple[int, object, bytes]] = deque()  # (id, domain event, stored bytes)
        self._lock = threading.Lock()
        store.on_recorded(self._remember)

    def _remember(self, recordings: list[Recording]) -> None:
        """After a commit (from any thread): keep what it recorded, and wake up."""
        if recordings and self.holding:  # Not holding: the log has it when this relay takes over.
            with self._lock:
                if len(self._recent) >= MEMORY_LIMIT:
                    self._recent.clear()  # Not published for a while: the log has all of it.
                self._recent.extend((r.notification.id, r.domain_event, r.notification.state)
                                    for r in recordings)
        self.wake()

    def wake(self) -> None:
        """Thread-safe: ask the relay to look for new events now."""
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def position(self) -> int:
        return self._store.process_recorder.max_tracking_id(RELAY_TRACKING) or 0

    def backlog(self) -> int:
        """Events recorded in the store and not yet published: its last notification id minus
        the relay's position (two indexed lookups, no scan)."""
        return max(0, (self._store.process_recorder.max_notification_id() or 0) - self.position())

    def _from_memory(self, position: int) -> list[tuple[int, object, bytes]]:
        """The recorded events that directly follow `position`, without a gap (up to a batch)."""
        taken: list[tuple[int, object, bytes]] = []
        with self._lock:
            recent = self._recent
            while recent and recent[0][0] <= position:
                recent.popleft()  # Already published (e.g. read from the log).
            expected = position + 1
            while recent and recent[0][0] == expected and len(taken) < self._batch_size:
                taken.append(recent.popleft())
                expected += 1
        return taken

    def _next_batch(self, position: int) -> tuple[int, list[Outgoing]]:
        taken = self._from_memory(position)
        if taken:
            messages = [outgoing_of(event, state) for _, event, state in taken]
            last_id = taken[-1][0]
        else:
            notifications = self._store.process_recorder.select_notifications(
                position, self._batch_size, inclusive_of_start=False
            )
            if not notifications:
                return position, []
            mapper = self._store.mapper
            messages = [outgoing_of(mapper.to_domain_event(n), n.state) for n in notifications]
            last_id = notifications[-1].id
        return last_id, [m for m in messages if m is not None]

    async def drain(self) -> int:
        """Publish everything recorded so far; returns how many envelopes were published
        (not counting those dead-lettered)."""
        published = 0
        position = self.position()
        while True:
            last_id, messages = self._next_batch(position)
            if last_id == position:
                return published
            for part in _parts_of_at_most(messages, BATCH_MAX_BYTES):
                published += await self._publish_setting_aside_the_unpublishable(part)
            try:
                self._store.process_recorder.insert_tracking(Tracking(RELAY_TRACKING, last_id))
            except IntegrityError:  # A relay that took over meanwhile recorded it: as good.
                pass
            position = last_id

    async def _publish_setting_aside_the_unpublishable(self, messages: list[Outgoing]) -> int:
        """Publish `messages` in order, dead-lettering each the bus will never take; returns how
        many were published. (Re-publishing the ones before a refused one is harmless: JetStream
        drops what it already has by its Nats-Msg-Id.)"""
        published = 0
        while messages:
            try:
                await self._publisher.publish_batch(messages)
                return published + len(messages)
            except Unpublishable as refused:
                at = next((i for i, m in enumerate(messages) if m.event_id == refused.event_id), None)
                if at is None:
                    raise
                reason = refused.reason
            if at:
                published += await self._publish_setting_aside_the_unpublishable(messages[:at])
            await self._dead_letter(messages[at], reason)
            messages = messages[at + 1:]
        return published

    async def _dead_letter(self, message: Outgoing, reason: str) -> None:
        _, _, task_id, event_type = message.subject.split(".", 3)  # baton.task.<task id>.<type>
        body = {"event_id": message.event_id, "type": event_type, "task_id": task_id,
                "size": len(message.payload), "reason": reason, "producer": self._store.name}
        log.error("relay: event %s (%s of task %s, %d bytes) can never be published (%s); "
                  "dead-lettered to %s, going on with the next", message.event_id, event_type,
                  task_id, len(message.payload), reason, self._dead_letter_subject)
        await self._publisher.publish_dead_letter(self._dead_letter_subject, body,
                                                  msg_id=f"relay-{message.event_id}")
        self.dead_lettered += 1
        if self._on_dead_letter is not None:
            self._on_dead_letter(task_id, event_type, reason)

    async def run(self, *, poll_interval_s: float = 1.0, retry_s: float = 0.5,
                  others_poll_s: float = 0.2) -> None:
        """While holding the store's lease (waiting to take it when another replica holds it),
        drain whenever woken and every `poll_interval_s` (`others_poll_s` with a lease: other
        replicas may have recorded events), until cancelled; the lease is released on the way out."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self._lease is not None:
            poll_interval_s = min(poll_interval_s, others_poll_s)
        try:
            await self._drain_while_holding(poll_interval_s, retry_s)
        finally:
            if self._lease is not None:
                if self._taking is not None:  # A take may still run in its thread: let it end first.
                    await asyncio.gather(self._taking, return_exceptions=True)
                self.holding = False
                self._lease.release()

    async def _hold_lease(self) -> None:
        """Return once this relay holds the lease (at once without one; re-checked every
        LEASE_CHECK_S); until then, try again every LEASE_RETRY_S."""
        if self._lease is None or (self.holding and time.monotonic() < self._lease_checked_at + LEASE_CHECK_S):
            return
        while not await self._take_lease():
            if self.holding:
                log.warning("relay of store %s: lost its lease; another replica publishes", self._store.name)
            self.holding = False
            await asyncio.sleep(LEASE_RETRY_S)
        if not self.holding:
            log.info("relay of store %s: holds the lease, publishes from position %d",
                     self._store.name, self.position())
        self.holding = True
        self._lease_checked_at = time.monotonic()

    async def _take_lease(self) -> bool:
        assert self._lease is not None
        # PostgreSQL: a round trip, in a thread; shielded, so a stop waits for it (in `run`)
        # rather than release a lease a thread is still taking.
        self._taking = asyncio.ensure_future(asyncio.to_thread(self._lease.take))
        return await asyncio.shield(self._taking)

    async def _drain_while_holding(self, poll_interval_s: float, retry_s: float) -> None:
        while True:
            await self._hold_lease()
            self._wake.clear()
            try:
                await self.drain()
            except Exception as error:  # NATS down, timeouts: the store keeps everything.
                log.warning("relay publish failed, will retry: %s", error)
                await asyncio.sleep(retry_s)
                continue
            # `asyncio.timeout`, not `wait_for`: on Python 3.11 `wait_for` can swallow a
            # cancellation that arrives as the wake-up does, and the relay would not stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_interval_s):
                    await self._wake.wait()


def _parts_of_at_most(messages: list[Outgoing], max_bytes: int) -> list[list[Outgoing]]:
    """`messages` in order, in consecutive parts of at most `max_bytes` of payload (or one message)."""
    parts: list[list[Outgoing]] = [[]]
    size = 0
    for message in messages:
        if parts[-1] and size + len(message.payload) > max_bytes:
            parts.append([])
            size = 0
        parts[-1].append(message)
        size += len(message.payload)
    return parts


def pending_envelopes(store: ServiceStore) -> Sequence[Envelope]:
    """What the relay has not yet published (for tests and shutdown checks)."""
    relay_position = store.process_recorder.max_tracking_id(RELAY_TRACKING) or 0
    notifications = store.process_recorder.select_notifications(
        relay_position, 10_000, inclusive_of_start=False
    )
    envelopes = (envelope_of(store.mapper.to_domain_event(n)) for n in notifications)
    return [e for e in envelopes if e is not None]
