"""What the bus will never take, against a real nats-server: refused at once with the event's id,
dead-lettered by the relay, and the stream's limits as configured."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from events import STREAM, TaskFailed, envelope_for
from services.runtime.bus import (
    DEAD_LETTER_STREAM,
    PUBLISH_ACK_TIMEOUT_S,
    Bus,
    StreamLimits,
    Unpublishable,
    ensure_stream,
    open_bus,
)
from services.runtime.relay import Relay
from services.task_runner.domain import Task
from tests.support.processes import free_port, nats_server_binary
from tests.unit.fakes import popo_store


def failed(task_id: str, reason: str):
    return envelope_for(TaskFailed(reason=reason), task_id=task_id, actor="test")


async def test_an_event_over_the_max_payload_is_refused_at_once_naming_it(bus: Bus):
    small, huge = failed("t1", "fits"), failed("t2", "x" * (bus.nc.max_payload + 1))
    with pytest.raises(Unpublishable) as refused:
        await bus.publish_batch([small, huge])
    assert refused.value.event_id == huge.event_id
    assert f"max payload of {bus.nc.max_payload} bytes" in refused.value.reason


async def test_a_relay_dead_letters_an_oversized_event_on_the_real_bus_and_publishes_the_next(bus: Bus):
    store = popo_store()
    huge, after = Task("t1", "file:///r", "p", "shell", None), Task("t2", "file:///r", "p", "shell", None)
    too_big = huge.emit(TaskFailed(reason="x" * (bus.nc.max_payload + 1)), actor="a")
    store.save(huge)
    following = after.emit(TaskFailed(reason="next"), actor="a")
    store.save(after)
    relay = Relay(store, bus)
    assert await relay.drain() == 1
    # The next task's event is on the stream; the oversized one is parked, small, with its reason.
    last = await bus.last_event("t2", "TaskFailed")
    assert last is not None and last.event_id == following.event_id
    assert await bus.last_event("t1", "TaskFailed") is None
    parked = await bus.js.get_last_msg(DEAD_LETTER_STREAM, "baton.deadletter.relay.test")
    body = json.loads(parked.data)
    assert (body["event_id"], body["task_id"], body["type"]) == (too_big.event_id, "t1", "TaskFailed")
    assert body["size"] > bus.nc.max_payload and len(parked.data) < 1000
    assert (await bus.js.stream_info(DEAD_LETTER_STREAM)).state.messages == 1


async def test_the_stream_limits_are_applied_read_back_and_kept_by_a_process_without_them(bus: Bus):
    limits = StreamLimits(max_bytes=64 * 1024**2, max_age_s=3600.0)
    await ensure_stream(bus.js, limits=limits, max_msg_size=bus.nc.max_payload)
    config = (await bus.js.stream_info(STREAM)).config
    assert (config.max_bytes, config.max_age, config.max_msg_size) == (64 * 1024**2, 3600.0, bus.nc.max_payload)
    # A process that has no settings (limits None) leaves them as they are.
    await ensure_stream(bus.js, max_msg_size=bus.nc.max_payload)
    assert StreamLimits.of((await bus.js.stream_info(STREAM)).config) == StreamLimits(
        64 * 1024**2, 3600.0, bus.nc.max_payload, replicas=1)


# --- A NATS with permissions: a refused subject is known at once, not after the ack timeout. ---

PERMISSIONS_CONFIG = """
jetstream {{ store_dir: "{store}" }}
authorization {{
  users = [
    {{ user: narrow, password: narrow-pass,
       permissions: {{ publish: {{ allow: ["baton.task.mine.>", "$JS.API.>", "baton.deadletter.>"] }},
                      subscribe: {{ allow: ["_INBOX.>"] }} }} }}
  ]
}}
"""


@pytest.fixture
def narrow_nats(tmp_path: Path) -> Iterator[str]:
    import subprocess

    from tests.support.waiting import wait_for

    port = free_port()
    config = tmp_path / "narrow.conf"
    config.write_text(PERMISSIONS_CONFIG.format(store=tmp_path / "js"))
    process = subprocess.Popen([nats_server_binary(), "-c", str(config), "-a", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import socket

        wait_for(lambda: socket.create_connection(("127.0.0.1", port), 0.5).close() or True,
                 timeout_s=20, what="the nats-server with permissions")
        yield f"nats://narrow:narrow-pass@127.0.0.1:{port}"
    finally:
        process.kill()
        process.wait()


async def test_a_subject_the_connection_may_not_publish_to_is_refused_at_once_naming_the_event(narrow_nats):
    async with open_bus(narrow_nats, name="narrow") as bus:
        mine, forged = failed("mine", "ok"), failed("other", "forged")
        started = time.monotonic()
        with pytest.raises(Unpublishable) as refused:
            await bus.publish_batch([mine, forged])
        assert time.monotonic() - started < PUBLISH_ACK_TIMEOUT_S / 2
        assert refused.value.event_id == forged.event_id
        assert "permissions violation" in refused.value.reason
        # The connection stays usable: its own subjects still publish.
        await asyncio.wait_for(bus.publish_batch([failed("mine", "again")]), 5)
