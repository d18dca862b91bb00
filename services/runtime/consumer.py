"""Durable JetStream consumers whose effects happen once, in each task's order.

A service reads the stream through one durable pull consumer per partition (`<service>-p<k>`:
the stored subjects of every event type it handles in partition k, see `events.partition_of`),
or one over every event (`<service>-all`). Its replicas share each consumer as members of a
pinned priority group (`pinned_pull`): one replica at a time handles a partition, in stream
order. A handler records its new events together with the message's tracking position
(`Tracking(consumer, stream_seq)`) in one transaction, so a redelivered message is recognised
and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import nats.errors
import nats.js.errors
from eventsourcing.persistence import Tracking
from nats.aio.msg import Msg
from pydantic import ValidationError

from events import PARTITIONS, STREAM, Envelope, partition_of, stored_subject
from events.envelope import STREAM_SUBJECTS, partition_subjects
from events.versions import MissingUpcaster, current_shape
from services.runtime.bus import DEAD_LETTER_PREFIX, DEAD_LETTER_STREAM, Bus
from services.runtime.nats_fast_path import ack_all
from services.runtime.logs import log_context
from services.runtime.pinned_pull import ConsumerSetupError, PinnedPull

__all__ = ["ConsumerSetupError", "HeldPartitions", "OrderedReader", "Subscription", "consume", "readers_for", "run_all"]

log = logging.getLogger(__name__)

MAX_DELIVER = 5
"""A message delivered more often than this (the process died handling it) is dead-lettered."""
ACK_WAIT_S = 10.0
"""Short, so a message a killed process was handling is redelivered soon after its restart;
a handler that runs longer keeps its message alive with `in_progress` (KEEPALIVE_S)."""
KEEPALIVE_S = 2.0
PIN_CHECK_S = 2.0
"""How often an idle reader asks JetStream who holds its partition."""
STANDBY_S = 2.0
"""How long a replica waits before pulling a partition another replica prefers."""
RETRY_DELAYS_S = (0.2, 1.0, 3.0)
"""In-place retries of a failing handler before its message is dead-lettered."""

FETCH_BATCH = 500
"""Messages asked for per fetch: a backlog (a chatty agent's output) is read, handled in one
transaction and acked in a few large steps, not in many small ones."""

Handler = Callable[[Envelope, Tracking], Awaitable[None]]
BatchHandler = Callable[[list[tuple[Envelope, Tracking]]], Awaitable[None]]
"""Handles a run of events in stream order in one transaction (read models keeping up)."""


class TrackingStore(Protocol):
    def is_processed(self, tracking: Tracking) -> bool: ...
    def save_processed(self, tracking: Tracking, *aggregates: object) -> None: ...


ALL_EVENTS = "*"
"""A subscription to every event of every task, in stream order (e.g. the audit log)."""


@dataclass(frozen=True)
class Subscription:
    """`handle` runs for every event of `event_type` (or of every type: ALL_EVENTS), across all
    tasks; `handle_batch`, when a service's subscriptions share one, takes runs of them."""

    event_type: str
    handle: Handler
    handle_batch: BatchHandler | None = None


class HeldPartitions:
    """The partitions this replica handles now, as its readers learn from JetStream: one it is
    pinned to is held, one another replica is pinned to is not, and one nobody is pinned to (no
    event since the last pin timed out) is held by the replica that prefers it (`partition %
    replicas == index`: the one that pulls it first). A service's own loops (the monitor's
    deadlines) act on the tasks of these partitions only, so two replicas never both act on one
    task; `listeners(partition, held)` hear each change (what a service resumes at its start, a
    replica among several resumes as each partition is found held)."""

    def __init__(self, replica: tuple[int, int] = (0, 1)) -> None:
        index, count = replica
        self.sole = count == 1  # The only replica holds every partition, whatever happens.
        self.preferred = frozenset(k for k in range(PARTITIONS) if k % count == index)
        # One of several holds nothing until its readers have heard from JetStream.
        self.partitions = set(range(PARTITIONS)) if self.sole else set()
        self.listeners: list[Callable[[int, bool], None]] = []

    def observe(self, partition: int, pinned_here: bool | None) -> None:
        """What JetStream said of the partition's pin: here, elsewhere, or nowhere (None)."""
        self.change(partition, partition in self.preferred if pinned_here is None else pinned_here)

    def __contains__(self, partition: int) -> bool:
        return partition in self.partitions

    def holds_task(self, task_id: str) -> bool:
        return partition_of(task_id) in self.partitions

    def change(self, partition: int, held: bool) -> None:
        if self.sole or (partition in self.partitions) == held:
            return
        (self.partitions.add if held else self.partitions.discard)(partition)
        log.info("partition %d %s", partition, "taken" if held else "given up")
        for listener in self.listeners:
            listener(partition, held)


class OrderedReader:
    """Reads one durable consumer (a partition of the stream, or all of it) for one service, and
    hands its events over in stream order, exactly once, while this replica holds its pin.

    Order holds across replicas: the first deliveries of a consumer come in stream order, so a run
    whose consumer sequences follow on from the last one this replica got needs no check. After a
    gap (this replica just started or was just pinned, a redelivery) earlier deliveries may still
    be in another replica's hands or waiting to be redelivered: what arrives is held, in stream
    order and kept alive, until every delivered message not yet acknowledged is here (JetStream's
    `num_ack_pending`), and only then handled.
    """

    def __init__(self, bus: Bus, *, durable: str, filters: list[str], dispatch: Handler,
                 handle_batch: BatchHandler | None, store: TrackingStore, standby_s: float = 0.0,
                 ack_wait_s: float = ACK_WAIT_S, batch: int = FETCH_BATCH,
                 partition: int | None = None, held_partitions: HeldPartitions | None = None) -> None:
        self.bus, self.durable, self.filters = bus, durable, filters
        self.partition, self.held_partitions = partition, held_partitions
        self.dispatch, self.handle_batch, self.store = dispatch, handle_batch, store
        self.standby_s, self.ack_wait_s, self.batch = standby_s, ack_wait_s, batch
        self.pull = PinnedPull(bus.nc, STREAM, durable)
        self.held: dict[int, Msg] = {}  # stream seq -> latest delivery, not yet handled
        self.last_cseq: int | None = None
        self.in_order = False  # Every unacknowledged delivery is in `held`.
        self.pin_checked_at = 0.0

    async def run(self) -> None:
        await self.pull.bind(self.filters, ack_wait_s=self.ack_wait_s)
        try:
            if self.standby_s:
                await asyncio.sleep(self.standby_s)  # Another replica prefers this partition: let it pull first.
            while True:
                await self._step()
        finally:
            await self.pull.close()

    async def _step(self) -> None:
        try:
            messages = await self.pull.fetch(max(self.batch - len(self.held), 1), timeout_s=1.0)
        except (nats.errors.ConnectionClosedError, nats.errors.NoRespondersError) as error:
            log.warning("consumer %s: %s; retrying", self.durable, error)
            await asyncio.sleep(0.5)
            return
        await self._note_pin()
        self._hold(messages)
        if not self.held:
            return
        if not self.in_order:
            await self.bus.nc.flush()  # Our own acks reach the server before it is asked.
            self.in_order = await self.pull.pending_acks() <= len(self.held)
            if not self.in_order:
                await asyncio.gather(*(message.in_progress() for message in self.held.values()))
                return
        run = [self.held[seq] for seq in sorted(self.held)]
        self.held.clear()
        await self._handle(run)

    async def _note_pin(self) -> None:
        """Tell `held_partitions` who holds this partition: on each pin gained or lost, and every
        PIN_CHECK_S while idle (a replica never pinned hears no refusal, only silence)."""
        held, partition = self.held_partitions, self.partition
        if held is None or partition is None or held.sole:
            return
        if self.pull.pin_lost:
            self.pull.pin_lost = False
            held.observe(partition, False)
        elif self.pull.pin_changed:
            held.observe(partition, True)
        now = asyncio.get_running_loop().time()
        if not self.held and now - self.pin_checked_at >= PIN_CHECK_S:
            self.pin_checked_at = now
            held.observe(partition, await self.pull.pinned_here())

    def _hold(self, messages: list[Msg]) -> None:
        if self.pull.pin_changed:
            self.pull.pin_changed, self.in_order = False, False
        for message in messages:
            sseq, cseq, delivered = _delivery(message)
            if delivered != 1 or self.last_cseq is None or cseq != self.last_cseq + 1:
                self.in_order = False
            self.last_cseq = cseq
            self.held[sseq] = message

    async def _handle(self, run: list[Msg]) -> None:
        left = list(run)

        async def pulse() -> None:
            """While a handler runs long: keep this replica's pin and the run's messages."""
            await asyncio.gather(*(message.in_progress() for message in (*left, *self.pull.buffered)))
            await self.pull.request(1, expires_s=KEEPALIVE_S * 0.9)

        if self.handle_batch is not None and len(run) > 1:
            await _process_batch(self.bus, self.durable, run, self.dispatch, self.handle_batch,
                                 self.store, pulse)
            return
        while left:
            await _process(self.bus, self.durable, left.pop(0), self.dispatch, self.store, pulse=pulse)


def _delivery(message: Msg) -> tuple[int, int, int]:
    """(stream seq, consumer seq, times delivered) from the ack subject
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` (or the longer form)."""
    tokens = (message.reply or "").split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[6]), int(tokens[4])
    metadata = message.metadata
    return metadata.sequence.stream, metadata.sequence.consumer, metadata.num_delivered


def readers_for(bus: Bus, *, service: str, subscriptions: Sequence[Subscription], store: TrackingStore,
                replica: tuple[int, int] = (0, 1), held_partitions: HeldPartitions | None = None,
                **options: Any) -> list[OrderedReader]:
    """The readers that serve `subscriptions`: one over every event (ALL_EVENTS), and one per
    partition for the typed ones, each preferring replica `partition % replicas`."""
    index, count = replica
    readers = []
    for chosen, durables in ((_every(subscriptions), lambda: [(f"{service}-all", [STREAM_SUBJECTS[0]], 0)]),
                             (_typed(subscriptions), lambda: [
                                 (f"{service}-p{k}", partition_subjects(k, sorted(_typed_types(subscriptions))), k)
                                 for k in range(PARTITIONS)])):
        if not chosen:
            continue
        dispatch, handle_batch = _dispatcher(chosen)
        for durable, filters, partition in durables():
            readers.append(OrderedReader(
                bus, durable=durable, filters=filters, dispatch=dispatch, handle_batch=handle_batch,
                store=store, standby_s=0.0 if partition % count == index else STANDBY_S,
                partition=partition if durable != f"{service}-all" else None,
                held_partitions=held_partitions, **options))
    return readers


def _every(subscriptions: Sequence[Subscription]) -> list[Subscription]:
    return [s for s in subscriptions if s.event_type == ALL_EVENTS]


def _typed(subscriptions: Sequence[Subscription]) -> list[Subscription]:
    return [s for s in subscriptions if s.event_type != ALL_EVENTS]


def _typed_types(subscriptions: Sequence[Subscription]) -> set[str]:
    return {s.event_type for s in _typed(subscriptions)}


def _dispatcher(subscriptions: list[Subscription]) -> tuple[Handler, BatchHandler | None]:
    """One handler that calls each event's own, and the batch handler they share (if they do)."""
    by_type = {s.event_type: s.handle for s in subscriptions}
    every = by_type.get(ALL_EVENTS)
    batches = {s.handle_batch for s in subscriptions}

    async def dispatch(envelope: Envelope, tracking: Tracking) -> None:
        handle = every or by_type.get(envelope.type)
        if handle is None:
            raise MisroutedEnvelope(f"no handler for {envelope.type}")
        await handle(envelope, tracking)

    return dispatch, (batches.pop() if len(batches) == 1 else None)


async def consume(
    bus: Bus,
    *,
    service: str,
    subscription: Subscription | Sequence[Subscription],
    store: TrackingStore,
    replica: tuple[int, int] = (0, 1),
    held_partitions: HeldPartitions | None = None,
    ack_wait_s: float = ACK_WAIT_S,
    batch: int = FETCH_BATCH,
) -> None:
    """Run a service's subscriptions until cancelled (see `OrderedReader`, `readers_for`);
    `held_partitions`, if given, follows which partitions this replica holds."""
    subscriptions = [subscription] if isinstance(subscription, Subscription) else list(subscription)
    readers = readers_for(bus, service=service, subscriptions=subscriptions, store=store,
                          replica=replica, held_partitions=held_partitions, ack_wait_s=ack_wait_s, batch=batch)
    await run_all(*(reader.run() for reader in readers))


class MisroutedEnvelope(ValueError):
    """An envelope whose task or type is not the one its subject names."""


def envelope_on_its_subject(message: Msg) -> Envelope:
    """The message's envelope, only if it says what its subject says: the bus lets a credential
    publish only on its own subjects (a vm_agent: its own task's), so an envelope claiming
    another task or type than its subject is forged and is never acted on. Its `data` is in its
    type's current shape (`current_shape`), so no handler reads an old version's fields."""
    envelope = Envelope.from_json(message.data)
    if message.subject != stored_subject(envelope.task_id, envelope.type):
        raise MisroutedEnvelope(
            f"misrouted envelope: it says {envelope.type} of task {envelope.task_id} but was "
            f"published on {message.subject}; not acted on")
    return current_shape(envelope)


Pulse = Callable[[], Awaitable[None]]
"""Called every KEEPALIVE_S while a handler runs: keeps the messages (and the reader's pin) alive."""


async def _process_batch(
    bus: Bus, durable: str, messages: list[Msg], handle: Handler, handle_batch: BatchHandler,
    store: TrackingStore, pulse: Pulse | None = None,
) -> None:
    """Apply a fetched batch in one transaction; if that fails, fall back to one at a time
    (which retries, and dead-letters only the message that cannot be handled)."""
    items = []
    for message in messages:
        tracking = Tracking(durable, stream_seq(message))
        try:
            items.append((envelope_on_its_subject(message), tracking))
        except (ValidationError, ValueError, MissingUpcaster):
            break  # Undecodable, unreadable or misrouted: leave it and what follows to the one-at-a-time path.
    fresh = _unprocessed(store, items)
    try:
        if fresh:
            await handle_batch(fresh)
    except Exception:
        log.warning("consumer %s: batch of %d failed; handling one at a time", durable, len(fresh))
        items = []
    await ack_all(messages[: len(items)])
    _log_handled(durable, fresh if items else [])
    for message in messages[len(items):]:
        await _process(bus, durable, message, handle, store, pulse=pulse)


def _log_handled(durable: str, items: list[tuple[Envelope, Tracking]]) -> None:
    """At debug level, one line per event handled: which consumer, task, type and stream seq
    (what a test reads to see each service took each task's events in stream order)."""
    if log.isEnabledFor(logging.DEBUG):
        for envelope, tracking in items:
            log.debug("handled %s of %s", envelope.type, envelope.task_id, extra={"fields": {
                "consumer": durable, "handled_task": envelope.task_id, "handled_type": envelope.type,
                "stream_seq": tracking.notification_id}})


def stream_seq(message: Msg) -> int:
    """The message's stream sequence, read straight from its ack subject when that has the
    common form `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.
    <pending>` (nats-py's `metadata` builds dataclasses and a datetime for it)."""
    reply = getattr(message, "reply", None)
    if reply and reply.startswith("$JS.ACK."):
        tokens = reply.split(".")
        if len(tokens) == 9:
            return int(tokens[5])
    return message.metadata.sequence.stream


def _unprocessed(store: TrackingStore, items: list[tuple[Envelope, Tracking]]) -> list[tuple[Envelope, Tracking]]:
    """The items not yet processed. A position is a high-water mark, so for a run in stream
    order the first and the last item tell (one or two queries instead of one per item)."""
    positions = [tracking.notification_id for _, tracking in items]
    if len(items) > 1 and all(a < b for a, b in zip(positions, positions[1:])):
        if not store.is_processed(items[0][1]):
            return items
        if store.is_processed(items[-1][1]):
            return []
    fresh, highest = [], 0
    for envelope, tracking in items:  # As one at a time would: once 9 is handled, 8 counts as done.
        if tracking.notification_id > highest and not store.is_processed(tracking):
            fresh.append((envelope, tracking))
        highest = max(highest, tracking.notification_id)
    return fresh


async def _process(
    bus: Bus, durable: str, message: Msg, handle: Handler, store: TrackingStore,
    *, retry_delays_s: Sequence[float] | None = None, pulse: Pulse | None = None,
) -> None:
    """Handle one message exactly once, or dead-letter it; either way the consumer moves on.

    Positions are a high-water mark per consumer, so messages are handled strictly in
    stream order: a failing handler is retried here, never nak'd behind later messages.
    """
    tracking = Tracking(durable, message.metadata.sequence.stream)
    if store.is_processed(tracking):
        await message.ack()
        return
    if message.metadata.num_delivered > MAX_DELIVER:
        # Delivered again and again without an ack: the handler keeps killing the process.
        await _give_up(bus, durable, message, store, tracking,
                       f"delivered {message.metadata.num_delivered} times without being handled")
        return
    try:
        envelope = envelope_on_its_subject(message)
    except MisroutedEnvelope as error:
        await _give_up(bus, durable, message, store, tracking, str(error))
        return
    except (ValidationError, ValueError) as error:
        await _give_up(bus, durable, message, store, tracking, f"undecodable envelope: {error}")
        return
    except MissingUpcaster as error:
        await _give_up(bus, durable, message, store, tracking, str(error))
        return
    for delay_s in (*(RETRY_DELAYS_S if retry_delays_s is None else retry_delays_s), None):
        try:
            await _handle_keeping_alive(message, handle, envelope, tracking, pulse)
            break
        except Exception as error:
            log.exception("consumer %s failed on %s", durable, envelope.event_id)
            if delay_s is None:
                await _give_up(bus, durable, message, store, tracking, repr(error))
                return
            await message.in_progress()
            if pulse is not None:
                await pulse()
            await asyncio.sleep(delay_s)
    if not store.is_processed(tracking):
        store.save_processed(tracking)
    await message.ack()
    _log_handled(durable, [(envelope, tracking)])


async def _handle_keeping_alive(message: Msg, handle: Handler, envelope: Envelope, tracking: Tracking,
                                pulse: Pulse | None = None) -> None:
    """Run the handler; while it runs, tell JetStream every few seconds not to redeliver yet
    (and `pulse`, so the reader keeps its pin and the messages it holds)."""
    with log_context(task_id=envelope.task_id, event_id=envelope.event_id):  # the handler's lines say which
        handling = asyncio.ensure_future(handle(envelope, tracking))
    try:
        while not (await asyncio.wait({handling}, timeout=KEEPALIVE_S))[0]:
            await message.in_progress()
            if pulse is not None:
                await pulse()
    finally:
        handling.cancel()
    handling.result()


async def _give_up(
    bus: Bus, durable: str, message: Msg, store: TrackingStore, tracking: Tracking, error: str
) -> None:
    await dead_letter(bus, durable, message, error)
    store.save_processed(tracking)
    await message.ack()


DEAD_LETTER_DATA_BYTES = 64 * 1024


async def dead_letter(bus: Bus, durable: str, message: Msg, error: str) -> None:
    """Park a message that cannot be handled where people can see it; never block on it."""
    log.error("dead-lettering stream seq %s from %s: %s", message.metadata.sequence.stream, durable, error)
    body = {
        "consumer": durable,
        "stream_seq": message.metadata.sequence.stream,
        "subject": message.subject,
        "error": error,
        # At most 64 KiB of it: the record must fit the bus even when the message barely did.
        "data": message.data[:DEAD_LETTER_DATA_BYTES].decode(errors="replace"),
        "size": len(message.data),
    }
    await bus.js.publish(f"{DEAD_LETTER_PREFIX}.{durable}", json.dumps(body).encode(),
                         stream=DEAD_LETTER_STREAM)


RECANCEL_S = 0.1
"""While stopping, a loop still running after this long is cancelled again (see `run_all`)."""


async def run_all(*tasks: Awaitable[None]) -> None:
    """Run a service's long-lived loops; if one dies the process exits (its supervisor restarts
    it); when cancelled, stop them all, promptly.

    A loop still running shortly after its cancellation is cancelled again until it ends: a
    library may swallow one cancellation (Python 3.11's `asyncio.wait_for` does when what it
    waits for completes at the same moment), and a stop must not wait on that.
    """
    running = [asyncio.ensure_future(t) for t in tasks]
    try:
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_EXCEPTION)
        for finished in done:
            finished.result()
    finally:
        pending = {task for task in running if not task.done()}
        while pending:
            for task in pending:
                task.cancel()
            try:
                _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
            except asyncio.CancelledError:
                pass  # Cancelled again while stopping (an enclosing run_all): stop them all first.
        for task in running:  # Retrieve each outcome: no "exception was never retrieved".
            if not task.cancelled():
                task.exception()


def subscriptions_for(handlers: dict[str, Handler]) -> Sequence[Subscription]:
    return [Subscription(event_type, handle) for event_type, handle in handlers.items()]
