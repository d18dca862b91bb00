"""Replicas share a store and one relay at a time publishes it, on SQLite and on PostgreSQL,
to a real nats-server: every event once, positions only forward, a killed holder replaced."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError

from events import STREAM, TaskFailed
from services.runtime.bus import Bus, Outgoing
from services.runtime.relay import Relay
from services.runtime.store import ServiceStore, postgres_env, sqlite_env
from services.task_runner.domain import Task
from tests.support.processes import REPO_ROOT, NatsServer
from tests.support.waiting import wait_for

STORE = "relay_replicas"


@pytest.fixture(params=["sqlite", "postgres"])
def store_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """One store's environment, as every replica of its service gets it."""
    if request.param == "sqlite":
        return sqlite_env(tmp_path / f"{STORE}.sqlite")
    database_url = request.getfixturevalue("postgres_url")
    return postgres_env(database_url, schema=f"baton_relay_{secrets.token_hex(4)}")


class CountingPublisher:
    """The bus, remembering the id of every event this relay published."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.published: list[str] = []

    async def publish_batch(self, messages: Sequence[Outgoing]) -> None:
        await self.bus.publish_batch(messages)
        self.published.extend(message.event_id for message in messages)

    async def publish_dead_letter(self, subject: str, body: dict, *, msg_id: str) -> None:
        await self.bus.publish_dead_letter(subject, body, msg_id=msg_id)


def record(store: ServiceStore, count: int) -> list[str]:
    """`count` events of new tasks recorded in `store`; their event ids."""
    ids = []
    for _ in range(count):
        task = Task(f"t{secrets.token_hex(6)}", "file:///r", "p", "shell", None)
        ids.append(task.emit(TaskFailed(reason="recorded by a replica"), actor="test").event_id)
        store.save(task)
    return ids


async def on_stream(bus: Bus) -> int:
    return (await bus.js.stream_info(STREAM)).state.messages


async def until(probe, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await probe():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        await asyncio.sleep(0.05)


async def test_two_replicas_recording_into_one_store_publish_each_event_once_moving_forward(
        bus: Bus, store_env: dict[str, str]):
    stores = [ServiceStore(STORE, store_env), ServiceStore(STORE, store_env)]
    publishers = [CountingPublisher(bus), CountingPublisher(bus)]
    relays = [Relay(store, publisher) for store, publisher in zip(stores, publishers)]
    running = [asyncio.create_task(relay.run()) for relay in relays]
    positions: list[int] = []

    async def sample_positions() -> None:
        while True:
            positions.append(relays[0].position())
            await asyncio.sleep(0.01)

    sampling = asyncio.create_task(sample_positions())
    try:
        async def one_holds() -> bool:
            return relays[0].holding or relays[1].holding
        await until(one_holds, timeout_s=10, what="a relay to take the lease")
        # Both replicas record, interleaved: the holder publishes its own from memory and the
        # other's from the log.
        recorded: list[str] = []
        for _ in range(10):
            recorded += await asyncio.to_thread(record, stores[0], 3)
            recorded += await asyncio.to_thread(record, stores[1], 3)

        async def all_on_stream() -> bool:
            return await on_stream(bus) == len(recorded)
        await until(all_on_stream, timeout_s=20, what=f"{len(recorded)} events on the stream")
        last = stores[0].process_recorder.max_notification_id()

        async def position_at_last() -> bool:
            return relays[0].position() == last
        await until(position_at_last, timeout_s=10, what="the relay position at the last notification")
    finally:
        sampling.cancel()
        for task in running:
            task.cancel()
        await asyncio.gather(sampling, *running, return_exceptions=True)
    # One relay published, each event exactly once; the other published nothing.
    assert [relay.holding for relay in relays] == [False, False]  # Released on the way out.
    published = publishers[0].published + publishers[1].published
    assert Counter(published) == Counter(recorded)
    assert sorted(len(p.published) for p in publishers) == [0, len(recorded)]
    # The position only moved forward, to the last notification.
    positions.append(relays[0].position())
    assert positions == sorted(positions) and positions[-1] == last


async def test_a_replica_takes_over_relaying_when_the_holder_is_killed(
        nats_server: NatsServer, bus: Bus, store_env: dict[str, str], tmp_path: Path):
    store = ServiceStore(STORE, store_env)
    # The first replica, a process of its own, holds the lease.
    out = tmp_path / "relay-replica.out"
    with out.open("w") as sink:
        holder = subprocess.Popen([sys.executable, "-m", "tests.support.relay_process", nats_server.url, STORE,
                                   json.dumps(store_env)], cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    standby = CountingPublisher(bus)
    second = Relay(store, standby)
    running = asyncio.create_task(second.run())
    try:
        wait_for(lambda: out.read_text().startswith("holding"), timeout_s=30, what="the first replica to hold")
        # What this replica records, the holder publishes (read from the log: not its memory).
        before = await asyncio.to_thread(record, store, 20)

        async def first_on_stream() -> bool:
            return await on_stream(bus) == len(before)
        await until(first_on_stream, timeout_s=20, what="the holder to publish the first events")
        assert not second.holding and standby.published == []
        # The holder dies without a word; the second replica takes over and publishes the rest.
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        after = await asyncio.to_thread(record, store, 20)

        async def all_on_stream() -> bool:
            return await on_stream(bus) == len(before) + len(after)
        await until(all_on_stream, timeout_s=30, what="the second replica to publish the rest")
        assert second.holding
        assert set(after) <= set(standby.published)
        assert second.position() == store.process_recorder.max_notification_id()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert await on_stream(bus) == len(before) + len(after)  # Each event on the stream once.


async def test_a_holder_whose_database_session_is_cut_stops_and_a_replica_publishes(bus: Bus, postgres_url: str):
    env = postgres_env(postgres_url, schema=f"baton_relay_{secrets.token_hex(4)}")
    stores = [ServiceStore(STORE, env), ServiceStore(STORE, env)]
    relays = [Relay(store, CountingPublisher(bus)) for store in stores]
    running = [asyncio.create_task(relay.run()) for relay in relays]
    try:
        async def one_holds() -> bool:
            return relays[0].holding != relays[1].holding
        await until(one_holds, timeout_s=10, what="a relay to take the lease")
        holder = relays[0] if relays[0].holding else relays[1]
        # The database ends the holder's session (a failover, an admin, a network cut): its lock goes.
        with psycopg.connect(postgres_url, autocommit=True) as db:
            cut = db.execute("SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                             "AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                             ).fetchall()
        assert len(cut) == 1

        async def holder_noticed() -> bool:
            return not holder.holding  # For at least a retry interval before it tries again.
        await until(holder_noticed, timeout_s=10, what="the holder to notice its lease is gone")
        recorded = await asyncio.to_thread(record, stores[0], 10)

        async def all_on_stream() -> bool:
            return await on_stream(bus) == len(recorded)
        await until(all_on_stream, timeout_s=20, what="a relay to publish after the cut")
        assert relays[0].holding != relays[1].holding  # One holds again, never both.
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def test_two_replicas_updating_one_aggregate_never_lose_an_update(store_env: dict[str, str]):
    # Optimistic concurrency, as the database enforces it between two replicas' stores: the later
    # save of the same version is refused whole (IntegrityError: what the consumer retries), and
    # the update made again on what the winner saved keeps both.
    first, second = ServiceStore(STORE, store_env), ServiceStore(STORE, store_env)
    task = Task(f"t{secrets.token_hex(6)}", "file:///r", "p", "shell", None)
    first.save(task)
    mine, theirs = first.repository.get(task.id), second.repository.get(task.id)
    mine.emit(TaskFailed(reason="the first replica's"), actor="test")
    theirs.emit(TaskFailed(reason="the second replica's"), actor="test")
    first.save(mine)
    with pytest.raises(IntegrityError):
        second.save(theirs)
    again = second.repository.get(task.id)
    again.emit(TaskFailed(reason="the second replica's"), actor="test")
    second.save(again)
    recorded = [event.envelope for event in first.events.get(task.id) if hasattr(event, "envelope")]
    assert [e["data"]["reason"] for e in recorded] == ["the first replica's", "the second replica's"]
