"""The partitioned, pinned consumption against the pinned nats-server: the stream's partitions
are the ones Baton computes, one replica at a time reads a partition, a dead replica's partition
moves, and a task's events are handled in stream order across the move."""

from __future__ import annotations

import asyncio
import secrets
import time

import nats
import nats.errors
from eventsourcing.persistence import Tracking

from events import STREAM, AgentOutput, Envelope, envelope_for, partition_of, stored_subject
from events.envelope import partition_subjects
from services.runtime.bus import Bus
from services.runtime.consumer import ALL_EVENTS, Subscription, ack_all
from services.runtime.partitions import OrderedReader, readers_for
from services.runtime.pinned_pull import PIN_TIMEOUT_S, PinnedPull
from tests.support.processes import NatsServer


def outputs(n: int, task_id: str) -> list[Envelope]:
    return [envelope_for(AgentOutput(seq=i + 1, stream="stdout", text=f"line {i}\n"), task_id=task_id,
                         actor="agent:shell") for i in range(n)]


def task_in(partition: int) -> str:
    while True:
        task_id = secrets.token_hex(8)
        if partition_of(task_id) == partition:
            return task_id


class HighWaterStore:
    """The TrackingStore contract of ServiceStore, in memory: positions are a high-water mark."""

    def __init__(self) -> None:
        self.positions: dict[str, int] = {}

    def is_processed(self, tracking: Tracking) -> bool:
        return self.positions.get(tracking.application_name, 0) >= tracking.notification_id

    def save_processed(self, tracking: Tracking, *aggregates: object) -> None:
        name = tracking.application_name
        assert self.positions.get(name, 0) < tracking.notification_id, "a position went backwards"
        self.positions[name] = tracking.notification_id


async def test_the_stream_stores_each_event_under_the_partition_baton_computes(bus: Bus):
    tasks = [secrets.token_hex(8) for _ in range(64)]
    for task_id in tasks:
        await bus.publish(outputs(1, task_id)[0])
    for seq, task_id in enumerate(tasks, start=1):
        assert (await bus.js.get_msg(STREAM, seq)).subject == stored_subject(task_id, "AgentOutput")
    # Every partition is used: the tasks spread.
    assert {partition_of(t) for t in tasks} == set(range(8))


async def test_a_backlog_is_read_in_batches_in_order_and_a_new_message_at_once(bus: Bus):
    task_id = task_in(3)
    pull = PinnedPull(bus.nc, STREAM, "test-p3")
    await pull.bind(partition_subjects(3, ["AgentOutput"]), ack_wait_s=10.0)
    envelopes = outputs(1200, task_id)
    await bus.publish_batch(envelopes)
    got = []
    deadline = time.monotonic() + 60
    while len(got) < 1200 and time.monotonic() < deadline:
        # A fetch may come back empty (woken by a request's end); never with more than asked.
        messages = await pull.fetch(500, timeout_s=2.0)
        assert len(messages) <= 500
        got += [Envelope.from_json(m.data) for m in messages]
        await ack_all(messages)
    assert got == envelopes
    assert await pull.fetch(500, timeout_s=0.5) == []
    published_at = 0.0

    async def publish_soon() -> None:
        nonlocal published_at
        await asyncio.sleep(0.2)
        published_at = time.monotonic()
        await bus.publish_batch(outputs(1, task_id))

    publishing = asyncio.create_task(publish_soon())
    late: list = []
    deadline = time.monotonic() + 60
    while not late and time.monotonic() < deadline:
        late = await pull.fetch(500, timeout_s=30.0)
    await publishing
    # Handed over when it came, not when the pull ran out (30 s; generous for a loaded CI).
    assert len(late) == 1 and time.monotonic() - published_at < 10
    await ack_all(late)
    await pull.close()


async def test_one_replica_at_a_time_reads_a_partition_and_a_dead_ones_moves_to_another(
    bus: Bus, nats_server: NatsServer
):
    task_id = task_in(5)
    replicas = [await nats.connect(nats_server.url) for _ in range(2)]
    pulls = [PinnedPull(nc, STREAM, "test-p5") for nc in replicas]
    for pull in pulls:
        await pull.bind(partition_subjects(5, ["AgentOutput"]), ack_wait_s=10.0)
    await bus.publish_batch(outputs(20, task_id))

    async def read(pull: PinnedPull, seconds: float) -> list[int]:
        got, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            messages = await pull.fetch(50, timeout_s=0.5)
            await ack_all(messages)
            got += [m.metadata.sequence.stream for m in messages]
        return got

    first, second = await asyncio.gather(read(pulls[0], 2.0), read(pulls[1], 2.0))
    # One of them is pinned and reads everything; the other nothing.
    assert sorted([len(first), len(second)]) == [0, 20]
    holder, standby = (0, 1) if first else (1, 0)
    await replicas[holder].close()  # The holder dies.
    died = time.monotonic()
    await bus.publish_batch(outputs(5, task_id))
    taken: list[int] = []
    while len(taken) < 5 and time.monotonic() - died < PIN_TIMEOUT_S + 15:
        taken += await read(pulls[standby], 1.0)
    assert len(taken) == 5, "the standby replica never took the partition over"
    await replicas[standby].close()


async def test_a_partition_is_handled_in_stream_order_across_a_takeover(bus: Bus, nats_server: NatsServer):
    """The first replica dies while it holds messages it has not acknowledged; the second one takes
    over and handles every event once, in stream order, though JetStream redelivers the dead
    replica's messages only after their ack wait, and delivers newer ones before that."""
    task_id = task_in(2)
    store = HighWaterStore()
    handled: list[tuple[str, int]] = []
    stuck = asyncio.Event()

    def replica(name: str, nc: nats.NATS, *, hang_on: int | None) -> OrderedReader:
        async def handle(envelope: Envelope, tracking: Tracking) -> None:
            if envelope.data["seq"] == hang_on:
                stuck.set()
                await asyncio.Event().wait()  # Never returns: the process is about to die.
            handled.append((name, envelope.data["seq"]))
            store.save_processed(tracking)

        [reader] = [r for r in readers_for(Bus(nc=nc, js=nc.jetstream()), service="svc",
                                           subscriptions=[Subscription("AgentOutput", handle)],
                                           store=store, ack_wait_s=4.0, batch=10)
                    if r.durable == "svc-p2"]
        return reader

    first_nc = await nats.connect(nats_server.url)
    second_nc = await nats.connect(nats_server.url)
    first = asyncio.create_task(replica("first", first_nc, hang_on=15).run())
    await bus.publish_batch(outputs(30, task_id))
    await asyncio.wait_for(stuck.wait(), 30)
    second = asyncio.create_task(replica("second", second_nc, hang_on=None).run())
    await asyncio.sleep(0.5)  # The second replica is pulling, as a standby.
    first.cancel()
    await first_nc.close()  # Dies holding 15..20 unacknowledged.
    await bus.publish_batch([envelope_for(AgentOutput(seq=31 + i, stream="stdout", text="late\n"),
                                          task_id=task_id, actor="agent:shell") for i in range(10)])
    deadline = time.monotonic() + 60
    while len(handled) < 40 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    await second_nc.close()
    assert [seq for _, seq in handled] == list(range(1, 15)) + list(range(15, 41))
    assert {name for name, seq in handled if seq >= 15} == {"second"}


async def test_readers_cover_every_partition_and_prefer_their_own(bus: Bus):
    async def handle(envelope: Envelope, tracking: Tracking) -> None: ...

    readers = readers_for(bus, service="svc", subscriptions=[
        Subscription("AgentOutput", handle), Subscription("TaskFailed", handle),
        Subscription(ALL_EVENTS, handle)], store=HighWaterStore(), replica=(1, 2))
    assert sorted(r.durable for r in readers) == ["svc-all", *sorted(f"svc-p{k}" for k in range(8))]
    p3 = next(r for r in readers if r.durable == "svc-p3")
    assert p3.filters == ["baton.task.*.AgentOutput.3", "baton.task.*.TaskFailed.3"]
    assert p3.standby_s == 0 and next(r for r in readers if r.durable == "svc-p2").standby_s > 0


async def test_a_reader_rides_out_jetstream_requests_that_time_out(bus: Bus):
    """While a NATS node dies, the consumer's requests time out until its new leader answers (CI
    saw every service's second replica exit on it, tests/capability/test_cluster.py): the reader
    keeps what it fetched and goes on."""
    task_id = task_in(5)
    handled: list[int] = []

    async def handle(envelope: Envelope, tracking: Tracking) -> None:
        handled.append(envelope.data["seq"])

    [reader] = [r for r in readers_for(bus, service="svc", subscriptions=[Subscription("AgentOutput", handle)],
                                       store=HighWaterStore(), replica=(0, 2), batch=10)
                if r.durable == "svc-p5"]
    answer, failures = reader.pull._info, [nats.errors.TimeoutError(), nats.errors.NoRespondersError()]

    async def info_while_a_node_dies() -> dict:
        if failures:
            raise failures.pop()
        return await answer()

    reader.pull._info = info_while_a_node_dies
    reader.pin_checked_at = -1e9  # Its first idle step asks who is pinned.
    reading = asyncio.create_task(reader.run())
    try:
        await bus.publish_batch(outputs(20, task_id))
        deadline = time.monotonic() + 30
        while len(handled) < 20 and time.monotonic() < deadline and not reading.done():
            await asyncio.sleep(0.1)
        assert not reading.done(), reading.exception()
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
    assert failures == [] and handled == list(range(1, 21))
