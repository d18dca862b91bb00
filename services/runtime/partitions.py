"""How a service reads the stream: each task's events in order, one replica at a time.

A service reads the stream through one durable pull consumer per partition (`<service>-p<k>`:
the stored subjects of every event type it handles in partition k, see `events.partition_of`),
or one over every event (`<service>-all`). Its replicas share each consumer as members of a
pinned priority group (`pinned_pull`): one replica at a time handles a partition, in stream
order (`OrderedReader`), and `HeldPartitions` tells a service's own loops which partitions are
its replica's. Each event is handled exactly once by `consumer._process` / `_process_batch`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import nats.errors
from eventsourcing.persistence import Tracking
from nats.aio.msg import Msg

from events import PARTITIONS, STREAM, Envelope, partition_of
from events.envelope import STREAM_SUBJECTS, partition_subjects
from services.runtime.bus import JETSTREAM_UNAVAILABLE, Bus
from services.runtime.consumer import (
    ACK_WAIT_S,
    ALL_EVENTS,
    FETCH_BATCH,
    KEEPALIVE_S,
    BatchHandler,
    Handler,
    MisroutedEnvelope,
    Subscription,
    TrackingStore,
    _process,
    _process_batch,
    run_all,
)
from services.runtime.nats_fast_path import flush
from services.runtime.pinned_pull import PinnedPull

TRANSIENT = (*JETSTREAM_UNAVAILABLE, nats.errors.ConnectionClosedError)
"""What a reader's JetStream request may meet while a node dies or a leader is elected: retried."""

log = logging.getLogger(__name__)

PIN_CHECK_S = 2.0
"""How often an idle reader asks JetStream who holds its partition."""
STANDBY_S = 2.0
"""How long a replica waits before pulling a partition another replica prefers."""


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
        self.index, self.count = index, count
        self.sole = count == 1  # The only replica holds every partition, whatever happens.
        self.preferred = frozenset(k for k in range(PARTITIONS) if k % count == index)
        self.replica_alive: Callable[[int], bool] = lambda replica: True
        """Whether this service's replica `replica` is alive (its heartbeats: `serve` sets it)."""
        # One of several holds nothing until its readers have heard from JetStream.
        self.partitions = set(range(PARTITIONS)) if self.sole else set()
        self.listeners: list[Callable[[int, bool], None]] = []

    def observe(self, partition: int, pinned_here: bool | None) -> None:
        """What JetStream said of the partition's pin: here, elsewhere, or nowhere (None)."""
        self.change(partition, self.quiet_holder(partition) == self.index if pinned_here is None else pinned_here)

    def quiet_holder(self, partition: int) -> int:
        """The replica that handles a partition nobody is pinned to: the one that prefers it, or,
        while that one is silent (dead), the next live one after it. So a dead replica's quiet
        partitions (no event to move a pin) are still watched: their deadlines, their unsettled work."""
        for step in range(self.count):
            replica = (partition + step) % self.count
            if replica == self.index or self.replica_alive(replica):
                return replica
        return self.index

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
        while True:
            try:
                await self.pull.bind(self.filters, ack_wait_s=self.ack_wait_s)
                break
            except TRANSIENT as error:
                await self._wait_out(error)
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
            await self._note_pin()
            self._hold(messages)
            await self._handle_held()
        except TRANSIENT as error:
            await self._wait_out(error)  # What was fetched stays held, or is redelivered.

    async def _wait_out(self, error: Exception) -> None:
        """A NATS node died or the consumer's leader is being elected: go on once JetStream
        answers again."""
        log.warning("consumer %s: %s; retrying", self.durable, error or type(error).__name__)
        await asyncio.sleep(0.5)

    async def _handle_held(self) -> None:
        if not self.held:
            return
        if not self.in_order:
            await flush(self.bus.nc)  # Our own acks reach the server before it is asked.
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
    """The readers that serve `subscriptions`: one over every event (ALL_EVENTS, `<service>-all`,
    preferring replica 0), and one per partition for the typed ones (`<service>-p<k>`, each
    preferring replica `k % replicas`)."""
    index, count = replica
    every = [s for s in subscriptions if s.event_type == ALL_EVENTS]
    typed = [s for s in subscriptions if s.event_type != ALL_EVENTS]
    readers = []
    if every:
        dispatch, handle_batch = _dispatcher(every)
        readers.append(OrderedReader(
            bus, durable=f"{service}-all", filters=[STREAM_SUBJECTS[0]], dispatch=dispatch,
            handle_batch=handle_batch, store=store, standby_s=0.0 if index == 0 else STANDBY_S, **options))
    if typed:
        dispatch, handle_batch = _dispatcher(typed)
        types = sorted({s.event_type for s in typed})
        readers.extend(OrderedReader(
            bus, durable=f"{service}-p{k}", filters=partition_subjects(k, types), dispatch=dispatch,
            handle_batch=handle_batch, store=store, standby_s=0.0 if k % count == index else STANDBY_S,
            partition=k, held_partitions=held_partitions, **options) for k in range(PARTITIONS))
    return readers


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
