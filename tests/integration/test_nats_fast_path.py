"""Contract: services/runtime/nats_fast_path.py against the pinned nats-py and nats-server. If a
nats-py upgrade moves the private parts it uses, this fails (and the fallbacks still work)."""

from __future__ import annotations

import asyncio
import subprocess
from importlib.metadata import version
from pathlib import Path

import nats

from events import STREAM, AgentOutput, envelope_for, partition_of
from events.envelope import partition_subjects
from services.runtime.bus import Bus
from services.runtime.nats_fast_path import ack_all, connection_of, flush, has_writer_api, send_commands
from services.runtime.nats_server import nats_server_binary
from services.runtime.pinned_pull import PinnedPull
from tests.support.processes import free_port, wait_for


def test_the_pinned_nats_py_has_the_private_writer():
    assert version("nats-py").startswith("2.16.")
    assert has_writer_api(nats.NATS())


async def test_commands_sent_in_one_write_arrive_in_order(bus: Bus):
    got: list[bytes] = []
    done = asyncio.Event()

    async def on_message(message) -> None:
        got.append(message.data)
        if len(got) == 100:
            done.set()

    await bus.nc.subscribe("fast.path", cb=on_message)
    await flush(bus.nc)
    await send_commands(bus.nc, b"".join(b"PUB fast.path %d\r\n%s\r\n" % (len(str(i)), str(i).encode())
                                         for i in range(100)))
    await asyncio.wait_for(done.wait(), 10)
    assert got == [str(i).encode() for i in range(100)]


async def test_many_acks_in_one_write_leave_nothing_pending_and_mark_each_acked(bus: Bus):
    assert connection_of(bus.js) is bus.nc
    pull = PinnedPull(bus.nc, STREAM, "contract-p0")
    await pull.bind(partition_subjects(0, ["AgentOutput"]), ack_wait_s=30.0)
    task_id = next(t for t in (f"{n:016x}" for n in range(1000)) if partition_of(t) == 0)
    await bus.publish_batch([envelope_for(AgentOutput(seq=i + 1, stream="stdout", text="x\n"), task_id=task_id,
                                          actor="agent:shell") for i in range(50)])
    messages: list = []
    while len(messages) < 50:
        messages += await pull.fetch(50, timeout_s=2.0)
    await ack_all(messages)
    assert all(m._ackd for m in messages)  # noqa: SLF001 - what Msg.ack would have set
    await flush(bus.nc)
    for _ in range(50):
        if await pull.pending_acks() == 0:
            break
        await asyncio.sleep(0.05)
    assert await pull.pending_acks() == 0
    await pull.close()


class TracedServer:
    """A nats-server tracing every protocol line it reads (`-V`), to see what reached it in what order."""

    def __init__(self, root: Path) -> None:
        self.log = root / "trace.log"
        self.port = free_port()
        self.process = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-V",
                                         "-l", str(self.log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def read_after(self, offset: int) -> list[str]:
        """The commands the server read since `offset` (SUB, PUB, PING…), in its order."""
        with self.log.open() as log:
            log.seek(offset)
            return [line.split("<<- [", 1)[1].split()[0].rstrip("]") for line in log if "<<- [" in line]


async def first_of(server: TracedServer, action, *commands: str) -> str:
    """Which of `commands` the server read first while `action` ran (a flush of our own settles it)."""
    nc = await nats.connect(f"nats://127.0.0.1:{server.port}")
    try:
        await flush(nc)
        offset = server.log.stat().st_size
        await action(nc)
        await flush(nc)
    finally:
        await nc.close()
    return next(c for c in server.read_after(offset) if c in commands)


async def test_flush_returns_only_after_the_subscription_before_it_reached_the_server(tmp_path: Path):
    server = TracedServer(tmp_path)
    try:
        wait_for(lambda: server.log.exists() and "Server is ready" in server.log.read_text(), timeout_s=20,
                 what="the traced nats-server")

        async def subscribe_then(flushing, nc) -> None:
            await nc.subscribe("order.probe")
            await flushing(nc)

        # nats-py's own flush pings ahead of the queued SUB (what `flush` exists for: when a nats-py
        # upgrade fixes it, this says so and `flush` can become `Client.flush` again).
        assert await first_of(server, lambda nc: subscribe_then(lambda c: c.flush(), nc), "SUB", "PING") == "PING"
        assert await first_of(server, lambda nc: subscribe_then(flush, nc), "SUB", "PING") == "SUB"
    finally:
        server.process.terminate()
        server.process.wait(10)
