"""Contract: services/runtime/nats_fast_path.py against the pinned nats-py and nats-server. If a
nats-py upgrade moves the private parts it uses, this fails (and the fallbacks still work)."""

from __future__ import annotations

import asyncio
from importlib.metadata import version

import nats

from events import STREAM, AgentOutput, envelope_for, partition_of
from events.envelope import partition_subjects
from services.runtime.bus import Bus
from services.runtime.nats_fast_path import ack_all, connection_of, has_writer_api, send_commands
from services.runtime.pinned_pull import PinnedPull


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
    await bus.nc.flush()
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
    await bus.nc.flush()
    for _ in range(50):
        if await pull.pending_acks() == 0:
            break
        await asyncio.sleep(0.05)
    assert await pull.pending_acks() == 0
    await pull.close()
