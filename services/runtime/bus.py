"""The NATS JetStream adapter: connect, check the stream, publish envelopes."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
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
    _acks: _BatchAcks | None = field(default=None, repr=False)

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

    async def publish_batch(self, messages: Sequence[Outgoing | Envelope]) -> None:
        """Publish in order, then wait for every ack (one round trip for the batch).

        Each message goes out with `Nats-Msg-Id` (its event id) and `Nats-Expected-Stream`,
        as `js.publish` would send it; raises if any ack is missing or an error.
        """
        if not messages:
            return
        if self._acks is None:
            self._acks = _BatchAcks(self.nc)
        await self._acks.publish(messages)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An envelope ready for the bus: its subject, its event id (the Nats-Msg-Id) and its JSON."""

    subject: str
    event_id: str
    payload: bytes

    def to_json(self) -> bytes:
        return self.payload


PUBLISH_ACK_TIMEOUT_S = 10.0
_SAFE_TOKEN = re.compile(r"[!-~]+")  # printable ASCII, no spaces: safe in a protocol line
_HEADERS = b"NATS/1.0\r\nNats-Expected-Stream: " + STREAM.encode() + b"\r\nNats-Msg-Id: "


class _BatchAcks:
    """Publishes a batch as one write of pre-built HPUB commands, with JetStream's acks
    collected by one wildcard inbox subscription.

    nats-py's `publish_async` costs a NUID, a future, a semaphore and a header dict per
    message; here a batch costs one reply prefix, one future and one write, and an ack costs
    one callback. Acks of an abandoned batch (timed out) are told apart by their batch number.
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = f"{nc.new_inbox()}."
        self._sub: Any = None
        self._batches: dict[str, _Batch] = {}
        self._next = 0

    async def publish(self, messages: Sequence[Outgoing | Envelope]) -> None:
        nc = self._nc
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if not nc.is_connected:
            raise ConnectionError("not connected to NATS (reconnecting)")
        if self._sub is None:
            self._sub = await nc.subscribe(self._prefix + "*.*", cb=self._on_ack)
        self._next += 1
        name = str(self._next)
        reply = f"{self._prefix}{name}."
        batch = _Batch(len(messages))
        commands = []
        max_payload = nc.max_payload
        for index, message in enumerate(messages):
            payload = message.to_json()
            subject, event_id = message.subject, message.event_id
            if not (_SAFE_TOKEN.fullmatch(subject) and _SAFE_TOKEN.fullmatch(event_id)):
                raise ValueError(f"cannot publish subject {subject!r} with id {event_id!r}")
            headers = b"%s%s\r\n\r\n" % (_HEADERS, event_id.encode())
            if len(payload) + len(headers) > max_payload:
                raise nats.errors.MaxPayloadError
            commands.append(b"HPUB %s %s%d %d %d\r\n%s%s\r\n" % (
                subject.encode(), reply.encode(), index, len(headers), len(headers) + len(payload),
                headers, payload))
        self._batches[name] = batch
        try:
            if has_writer_api(nc):
                await send_commands(nc, b"".join(commands))
            else:  # A nats-py without that private API: the same messages, one public call each.
                for index, message in enumerate(messages):
                    await nc.publish(message.subject, message.to_json(), reply=f"{reply}{index}", headers={
                        "Nats-Expected-Stream": STREAM, "Nats-Msg-Id": message.event_id})
            async with asyncio.timeout(PUBLISH_ACK_TIMEOUT_S):
                await batch.done
        finally:
            self._batches.pop(name, None)

    async def _on_ack(self, msg: Any) -> None:
        _, _, tail = msg.subject.rpartition(self._prefix)
        name, _, index = tail.partition(".")
        batch = self._batches.get(name)
        if batch is None or batch.done.done():
            return  # A batch given up on (timed out, failed): its caller publishes again.
        data = msg.data
        if not data.startswith(b'{"stream"') or b'"error"' in data:
            status = (msg.headers or {}).get("Status")
            batch.done.set_exception(
                nats.js.errors.Error(f"publish not acknowledged: {status or data[:200]!r}"))
            return
        if index not in batch.acked:
            batch.acked.add(index)
            if len(batch.acked) == batch.size:
                batch.done.set_result(None)


class _Batch:
    __slots__ = ("acked", "done", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.acked: set[str] = set()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


def has_writer_api(nc: Client) -> bool:
    """Whether this nats-py has the private writer `send_commands` uses (2.16 has); callers
    fall back to its public API without it."""
    return all(hasattr(nc, name) for name in ("_send_command", "_flush_queue", "_flush_pending"))


async def send_commands(nc: Client, commands: bytes) -> None:
    """Hand pre-built protocol commands to nats-py's writer, as `nc.publish` does for one.
    (Its private API: one write for many messages instead of one call each.)"""
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    await nc._send_command(commands)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()


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
