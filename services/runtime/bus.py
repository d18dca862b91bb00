"""The NATS JetStream adapter: connect, check the stream, publish envelopes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from events import STREAM, Envelope, subject_for
from events.envelope import STREAM_SUBJECTS

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 30 * 60
"""How long JetStream remembers a Nats-Msg-Id: a relay that re-sends within it stores nothing twice."""


class StreamSetupError(RuntimeError):
    """The stream exists but its read-back configuration is not what Baton needs."""

    def __init__(self, mismatches: dict[str, tuple[object, object]]) -> None:
        self.mismatches = mismatches
        detail = ", ".join(f"{k}: wanted {w!r}, got {g!r}" for k, (w, g) in mismatches.items())
        super().__init__(f"stream {STREAM} is misconfigured ({detail})")


@dataclass
class Bus:
    """A connection to NATS and its JetStream context."""

    nc: Client
    js: JetStreamContext

    async def publish(self, envelope: Envelope) -> int:
        """Publish and wait for the stream's ack; returns the stream sequence."""
        ack = await self.js.publish(
            envelope.subject,
            envelope.to_json(),
            stream=STREAM,
            headers={"Nats-Msg-Id": envelope.event_id},
        )
        return ack.seq

    async def last_event(self, task_id: str, event_type: str) -> Envelope | None:
        """The task's most recent event of `event_type` on the stream, if any."""
        try:
            message = await self.js.get_last_msg(STREAM, subject_for(task_id, event_type))
        except NotFoundError:
            return None
        return Envelope.from_json(message.data)

    async def publish_batch(self, envelopes: list[Envelope]) -> None:
        """Publish in order, then wait for every ack (one round trip for the batch)."""
        futures = [
            await self.js.publish_async(
                e.subject, e.to_json(), stream=STREAM, headers={"Nats-Msg-Id": e.event_id}
            )
            for e in envelopes
        ]
        await asyncio.gather(*futures)


DEAD_LETTER_STREAM = "BATON_DEADLETTER"
DEAD_LETTER_PREFIX = "baton.deadletter"


def dead_letter_stream_config() -> StreamConfig:
    """Messages no consumer could handle, with the error, kept for people to inspect."""
    return StreamConfig(
        name=DEAD_LETTER_STREAM,
        subjects=[f"{DEAD_LETTER_PREFIX}.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_msgs=100_000,
    )


def stream_config() -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        subjects=list(STREAM_SUBJECTS),
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_S,
    )


async def ensure_stream(js: JetStreamContext) -> None:
    """Create or update both streams idempotently, then verify what the server really kept."""
    await _create_or_update(js, dead_letter_stream_config())
    wanted = stream_config()
    got = await _create_or_update(js, wanted)
    mismatches = {
        name: (want, have)
        for name, want, have in (
            ("subjects", sorted(wanted.subjects or []), sorted(got.subjects or [])),
            ("storage", wanted.storage, got.storage),
            ("retention", wanted.retention, got.retention),
            ("duplicate_window", float(DUPLICATE_WINDOW_S), float(got.duplicate_window or 0)),
        )
        if want != have
    }
    if mismatches:
        raise StreamSetupError(mismatches)


async def _create_or_update(js: JetStreamContext, wanted: StreamConfig) -> StreamConfig:
    try:
        await js.stream_info(wanted.name)
        await js.update_stream(wanted)
    except NotFoundError:
        await js.add_stream(wanted)
    return (await js.stream_info(wanted.name)).config


async def dead_letter_count(js: JetStreamContext) -> int:
    return (await js.stream_info(DEAD_LETTER_STREAM)).state.messages


async def connect_nats(url: str, *, name: str, timeout_s: float = 30.0) -> Client:
    """Connect, retrying until `timeout_s` (NATS may still be starting); reconnect forever after."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await nats.connect(
                url,
                name=name,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=2,
            )
        except (OSError, nats.errors.NoServersError) as error:
            if asyncio.get_running_loop().time() > deadline:
                raise ConnectionError(f"cannot reach NATS at {url}: {error}") from error
            await asyncio.sleep(0.2)


@asynccontextmanager
async def open_bus(url: str, *, name: str) -> AsyncIterator[Bus]:
    """Connected, stream checked; closed on exit.

    Closed, not drained: nothing in flight needs finishing, because every effect is
    committed with its position and an unacknowledged message is simply redelivered.
    """
    nc = await connect_nats(url, name=name)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        yield Bus(nc=nc, js=js)
    finally:
        await nc.close()
