"""A replicated stream on a real 3-node nats-server cluster keeps taking events when its leader
is killed -9: a new leader is elected and publishing goes on (a relay's too, connected through the
cluster's URL list), nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.errors import NoRespondersError, TimeoutError as NatsTimeoutError
from nats.js.api import StreamConfig
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError
from nats.js.client import JetStreamContext

from events import STREAM as EVENTS
from events import TaskFailed
from services.runtime.bus import open_bus
from services.runtime.nats_auth import bus_is_open
from services.runtime.relay import Relay
from services.runtime.store import ServiceStore, sqlite_env
from services.task_runner.domain import Task
from tests.support.nats_cluster import NatsCluster, running_nats_cluster, stream_leader

STREAM = "CLUSTER_TEST"
NOT_NOW = (NatsTimeoutError, NoRespondersError, NoStreamResponseError, ServiceUnavailableError)
"""What a publish meets while the stream elects a new leader: try again."""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with running_nats_cluster(tmp_path / "cluster") as running:
        yield running


@pytest.fixture
async def js(cluster: NatsCluster) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(cluster.server_urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield nc.jetstream(timeout=2)
    finally:
        await nc.close()


async def publish_until_acked(js: JetStreamContext, number: int, *, timeout_s: float = 30) -> None:
    """Publish message `number` (deduplicated by its id) until the stream acknowledges it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await js.publish(f"ct.{number}", str(number).encode(), stream=STREAM,
                             headers={"Nats-Msg-Id": f"m{number}"})
            return
        except NOT_NOW:
            assert time.monotonic() < deadline, f"message {number} not acknowledged within {timeout_s:.0f}s"
            await asyncio.sleep(0.1)


async def every_replica_current(js: JetStreamContext, *, expected: int) -> bool:
    """The stream's leader sees `expected` followers, each online and caught up."""
    replicas = (await js.stream_info(STREAM)).cluster.replicas or []
    return len(replicas) == expected and all(peer.current and not peer.offline for peer in replicas)


async def test_a_replicated_stream_goes_on_taking_messages_when_its_leader_is_killed(cluster: NatsCluster,
                                                                                    js: JetStreamContext):
    # A stream kept on all three nodes, and read back as such.
    await js.add_stream(StreamConfig(name=STREAM, subjects=["ct.>"], num_replicas=3))
    assert (await js.stream_info(STREAM)).config.num_replicas == 3
    for number in range(20):
        await publish_until_acked(js, number)
    leader = await stream_leader(js, STREAM)
    assert leader in {node.name for node in cluster.nodes}
    # The leader dies without a word; the next messages are taken once a new leader is elected.
    cluster.kill(leader)
    for number in range(20, 40):
        await publish_until_acked(js, number)
    new_leader = await stream_leader(js, STREAM)
    assert new_leader not in (None, leader)
    info = await js.stream_info(STREAM)
    assert (info.state.messages, info.state.last_seq) == (40, 40)
    # The killed node comes back, catches up, and the stream is whole on every node.
    cluster.restart(leader)
    deadline = time.monotonic() + 30
    while not await every_replica_current(js, expected=len(cluster.nodes) - 1):
        assert time.monotonic() < deadline, "the restarted node did not catch up within 30s"
        await asyncio.sleep(0.2)
    assert [int((await js.get_msg(STREAM, seq)).data) for seq in range(1, 41)] == list(range(40))


def test_an_open_or_trusted_cluster_is_told_apart_through_any_live_node(tmp_path: Path):
    with running_nats_cluster(tmp_path / "open") as cluster:
        cluster.kill("n0")  # The first URL of the list answers nothing.
        assert asyncio.run(bus_is_open(cluster.url))
    with running_nats_cluster(tmp_path / "trusted", trusting=tmp_path / "baton") as cluster:
        assert not asyncio.run(bus_is_open(cluster.url))


async def test_a_relay_publishes_through_the_cluster_list_while_the_stream_leader_is_killed(tmp_path: Path):
    def record(store: ServiceStore, count: int) -> None:
        for number in range(count):
            task = Task(f"t{number}-{time.monotonic_ns()}", "file:///r", "p", "shell", None)
            task.emit(TaskFailed(reason="through the cluster"), actor="test")
            store.save(task)

    with running_nats_cluster(tmp_path / "cluster") as cluster:
        # Baton's own connection takes the comma-separated list, and the stream is kept on 3 nodes.
        async with open_bus(cluster.url, name="test") as bus:
            assert (await bus.js.stream_info(EVENTS)).config.num_replicas == 3
            store = ServiceStore("cluster_relay", sqlite_env(tmp_path / "store.sqlite"))
            relay = asyncio.create_task(Relay(store, bus).run())
            try:
                record(store, 30)
                await until_on_stream(bus.js, EVENTS, 30)
                # The stream's leader dies; what is recorded meanwhile is published once a new one leads.
                cluster.kill(await stream_leader(bus.js, EVENTS))
                record(store, 30)
                await until_on_stream(bus.js, EVENTS, 60)
            finally:
                relay.cancel()
                await asyncio.gather(relay, return_exceptions=True)
            info = await bus.js.stream_info(EVENTS)
            assert (info.state.messages, info.state.last_seq) == (60, 60)  # Each event once.


async def until_on_stream(js: JetStreamContext, stream: str, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if (await js.stream_info(stream)).state.messages >= count:
                return
        except NOT_NOW:
            pass  # No leader yet.
        assert time.monotonic() < deadline, f"{count} messages not on {stream} within {timeout_s:.0f}s"
        await asyncio.sleep(0.2)


async def test_both_of_batons_streams_are_made_r3_and_a_service_opens_the_bus_with_any_node_down(cluster: NatsCluster):
    from services.runtime.bus import DEAD_LETTER_STREAM

    async with open_bus(cluster.url, name="first") as bus:
        for stream in (EVENTS, DEAD_LETTER_STREAM):
            info = await bus.js.stream_info(stream)
            assert info.config.num_replicas == 3 and len(info.cluster.replicas or []) == 2, stream
    for down in ("n0", "n1", "n2"):
        cluster.kill(down)
        # A service (re)starting now still opens the bus: nothing it needs lives on one node only.
        async with asyncio.timeout(60):
            async with open_bus(cluster.url, name=f"with-{down}-down"):
                pass
        cluster.restart(down)
        cluster.wait_for_meta_leader()
