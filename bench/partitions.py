"""How long a dead replica's partition takes to move to a live one (issue 16).

Two replicas, each on its own NATS connection, read one partition's durable consumer through the
real reader (`services.runtime.partitions.OrderedReader`: the pinned priority group and its order
gate). One event shows which one is pinned; that one dies; the figure is the time from its death
to the other replica handling the next event. Three deaths:

- `killed`: idle (all it got acknowledged), its reader stops and its connection closes (a process
  killed, even with -9: the kernel closes its socket); a new event is published at once;
- `frozen`: the same, but its connection stays open (a hung process, or a machine gone without
  closing its sockets);
- `busy`: it dies (connection closed) while handling an event: the survivor handles that one.

nats-server unpins a replica that stopped pulling after `PIN_TIMEOUT_S`, whether or not its
connection closed; an event the dead replica was handling comes back after its `ACK_WAIT_S`
(the survivor's order gate waits for it). Rounds run at once, each on a partition of its own,
on a nats-server of their own.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from eventsourcing.persistence import Tracking

from events import PARTITIONS, AgentOutput, Envelope, envelope_for, partition_of
from services.runtime.bus import Bus, open_bus
from services.runtime.consumer import ACK_WAIT_S, Subscription, run_all
from services.runtime.partitions import OrderedReader, readers_for
from services.runtime.pinned_pull import PIN_TIMEOUT_S
from tests.support.processes import NatsServer

WAIT_S = PIN_TIMEOUT_S + ACK_WAIT_S + 20
DEATHS = ("killed", "frozen", "busy")


class PositionStore:
    """The TrackingStore contract in memory, shared by the two replicas (as their database is)."""

    def __init__(self) -> None:
        self.positions: dict[str, int] = {}

    def is_processed(self, tracking: Tracking) -> bool:
        return self.positions.get(tracking.application_name, 0) >= tracking.notification_id

    def save_processed(self, tracking: Tracking, *aggregates: object) -> None:
        self.positions[tracking.application_name] = tracking.notification_id


class Replicas:
    """Two replicas of one service reading partition `partition`; `handled` gets (replica, seq)."""

    def __init__(self, service: str, partition: int, *, hang_on: int | None) -> None:
        self.service, self.partition, self.hang_on = service, partition, hang_on
        self.store = PositionStore()
        self.handled: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        self.stuck = asyncio.Event()
        self.connections: list[nats.NATS] = []
        self.running: list[asyncio.Task[None]] = []

    async def start(self, url: str) -> None:
        self.connections = [await nats.connect(url, name=f"{self.service}-{i}") for i in range(2)]
        self.running = [asyncio.create_task(run_all(self._reader(nc, i).run()))
                        for i, nc in enumerate(self.connections)]

    def _reader(self, nc: nats.NATS, index: int) -> OrderedReader:
        async def handle(envelope: Envelope, tracking: Tracking) -> None:
            if envelope.data["seq"] == self.hang_on and not self.stuck.is_set():
                self.stuck.set()
                await asyncio.Event().wait()  # Handling it when it dies: it never acknowledges it.
            self.store.save_processed(tracking)
            self.handled.put_nowait((index, envelope.data["seq"]))

        readers = readers_for(Bus(nc=nc, js=nc.jetstream()), service=self.service, store=self.store,
                              subscriptions=[Subscription("AgentOutput", handle)])
        return next(r for r in readers if r.durable == f"{self.service}-p{self.partition}")

    async def kill(self, index: int, *, close: bool) -> None:
        self.running[index].cancel()
        await asyncio.gather(self.running[index], return_exceptions=True)
        if close:
            await self.connections[index].close()

    async def stop(self) -> None:
        for task in self.running:
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)
        for nc in self.connections:
            await nc.close()


async def move_once(bus: Bus, url: str, partition: int, death: str) -> float:
    """Seconds from the pinned replica's death (`death`: one of DEATHS) to the other one
    handling the event published right then (`busy`: the one the dead replica was handling)."""
    task_id = _task_in(partition)
    replicas = Replicas(f"benchmove{partition}", partition, hang_on=2 if death == "busy" else None)
    await replicas.start(url)
    try:
        await bus.publish(_output(task_id, 1))
        holder, _ = await asyncio.wait_for(replicas.handled.get(), WAIT_S)
        if death == "busy":
            await bus.publish(_output(task_id, 2))
            await asyncio.wait_for(replicas.stuck.wait(), WAIT_S)
        await replicas.kill(holder, close=death != "frozen")
        died = time.monotonic()
        if death != "busy":
            await bus.publish(_output(task_id, 2))
        taker, seq = await asyncio.wait_for(replicas.handled.get(), WAIT_S)
        moved_s = time.monotonic() - died
        assert (taker, seq) == (1 - holder, 2), f"replica {taker} handled {seq} after replica {holder} died"
        return moved_s
    finally:
        await replicas.stop()


def _task_in(partition: int) -> str:
    while True:
        task_id = secrets.token_hex(8)
        if partition_of(task_id) == partition:
            return task_id


def _output(task_id: str, seq: int) -> Envelope:
    return envelope_for(AgentOutput(seq=seq, stream="stdout", text="moved?\n"), task_id=task_id,
                        actor="agent:bench")


async def run(rounds: dict[str, int], *, workdir: Path | None = None) -> dict[str, Any]:
    """`rounds[death]` rounds of each death, all at once (each on a partition of its own, at most
    PARTITIONS in all), on a nats-server of their own: every round and the median of each death."""
    deaths = [death for death in DEATHS for _ in range(rounds.get(death, 0))]
    assert len(deaths) <= PARTITIONS, f"at most {PARTITIONS} rounds in all"
    with tempfile.TemporaryDirectory(dir=workdir) as scratch:
        server = NatsServer(Path(scratch) / "nats").start()
        try:
            async with open_bus(server.url, name="bench-partitions") as bus:
                took = await asyncio.gather(*(move_once(bus, server.url, k, death) for k, death in enumerate(deaths)))
        finally:
            server.stop()
    result: dict[str, Any] = {"pin_timeout_s": PIN_TIMEOUT_S, "ack_wait_s": ACK_WAIT_S}
    for death in DEATHS:
        seconds = [s for s, d in zip(took, deaths) if d == death]
        result[f"{death}_s"] = seconds
        result[f"{death}_median_s"] = statistics.median(seconds) if seconds else None
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(run({"killed": 3, "frozen": 1, "busy": 1}))))
