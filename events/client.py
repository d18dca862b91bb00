"""Reading Baton's events from another service: typed, in order, resumable.

    async for received in subscribe(nats_url, "reactor.creds", "reader-reactor"):
        if isinstance(received.event, TaskCompleted):
            ...

`durable` is the credential's own consumer (`baton credentials create --name reactor --read-only`
prints it). The first run starts at stream position `from_seq`; every later run resumes after the
last event it was handed and came back for (the consumer's ack), as the gateway's streams resume
from a position. Delivery is at least once: an event being handled when the process died comes
again, so a reaction that must not happen twice keys on `received.envelope.event_id`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from events.catalog import EVENT_TYPES, BaseEvent, parse_event
from events.envelope import STREAM, STREAM_SUBJECTS, Envelope
from events.versions import MissingUpcaster, current_shape

log = logging.getLogger(__name__)

FETCH_BATCH = 64
FETCH_WAIT_S = 5.0


def reader_inbox(durable: str) -> str:
    """The only inbox a reader credential may use: replies to it reach no one else."""
    return f"_INBOX_{durable}"


@dataclass(frozen=True)
class Received:
    """One event off the stream: its position, its envelope and the typed event, both in today's
    shape (`event` None, and the envelope as written, for a type or a version this release of Baton
    cannot read: a newer Baton wrote it)."""

    stream_seq: int
    envelope: Envelope
    event: BaseEvent | None


async def subscribe(nats_url: str, creds: str | Path, durable: str, *,
                    from_seq: int = 1) -> AsyncIterator[Received]:
    """Every event from `from_seq` (first run) or from where `durable` left off, then the live ones,
    forever. An event counts as handled once the caller asks for the next one."""
    async with _connected(nats_url, creds, durable) as nc:
        js = nc.jetstream()
        await _ensure_consumer(js, durable, from_seq)
        reader = await js.pull_subscribe_bind(durable=durable, stream=STREAM)
        while True:
            try:
                messages = await reader.fetch(FETCH_BATCH, timeout=FETCH_WAIT_S)
            except TimeoutError:
                # Nothing new yet. (nats-py raises its own TimeoutError, or a bare one when the
                # fetch's deadline runs out between its two pull requests, as under load.)
                continue
            for message in messages:
                received = _received(message.data, message.metadata.sequence.stream)
                if received is not None:
                    yield received
                await message.ack()


def _received(data: bytes, stream_seq: int) -> Received | None:
    try:
        envelope = Envelope.from_json(data)
    except ValidationError as error:
        # Not an envelope at all (the stream refuses no shape): skipped, and said so.
        log.warning("skipped stream_seq %s: not a Baton envelope (%s)", stream_seq, error.errors()[0]["msg"])
        return None
    try:
        envelope = current_shape(envelope)
    except MissingUpcaster as error:
        log.warning("stream_seq %s: %s", stream_seq, error)
        return Received(stream_seq, envelope, None)
    return Received(stream_seq, envelope, _typed(envelope, stream_seq))


def _typed(envelope: Envelope, stream_seq: int) -> BaseEvent | None:
    """The event of an envelope already in today's shape, or None where this release cannot read
    it (a type or a version a newer Baton wrote): the caller still has the envelope."""
    if envelope.type not in EVENT_TYPES:
        return None
    try:
        return parse_event(envelope)
    except ValidationError as error:
        log.warning("stream_seq %s: %s not readable as today's shape (%s)", stream_seq, envelope.type,
                    type(error).__name__)
        return None


async def _ensure_consumer(js: JetStreamContext, durable: str, from_seq: int) -> None:
    try:
        await js.consumer_info(STREAM, durable)
    except NotFoundError:
        await js.add_consumer(STREAM, ConsumerConfig(
            durable_name=durable, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=from_seq,
            ack_policy=AckPolicy.EXPLICIT, filter_subject=STREAM_SUBJECTS[0]))


@asynccontextmanager
async def _connected(nats_url: str, creds: str | Path, durable: str) -> AsyncIterator[Client]:
    # A cluster's servers as a comma-separated list, as everywhere in Baton.
    nc = await nats.connect([u.strip() for u in nats_url.split(",") if u.strip()], user_credentials=str(creds), inbox_prefix=reader_inbox(durable),
                            name=durable)
    try:
        yield nc
    finally:
        try:
            await nc.flush(timeout=2)  # The last acks reach the server before we go.
        finally:
            await nc.close()
