"""Reading events from the stream in order: a task's history, or history then the live tail.

Each reader is its own ephemeral JetStream consumer starting at a stream sequence, so the
switch from history to live has no gap and no duplicate, and a reader only fetches more once
it has sent what it has: a slow viewer slows its own consumer, and JetStream is the buffer.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from events import STREAM

log = logging.getLogger(__name__)

_ENVELOPE_START = b'{"event_id":'


@dataclass(frozen=True)
class RawEvent:
    """One event as stored, with `"stream_seq"` spliced into its JSON (no decode, no re-encode)."""

    stream_seq: int
    type: str
    json: bytes


def _raw_event(message: Msg) -> RawEvent | None:
    data, seq = message.data, message.metadata.sequence.stream
    # Relays publish pydantic's JSON, event_id first; anything else is not an event.
    if not (data.startswith(_ENVELOPE_START) and data.endswith(b"}")):
        log.warning("skipping a message that is not an envelope at stream seq %s", seq)
        return None
    return RawEvent(seq, message.subject.rsplit(".", 1)[-1], b'%s,"stream_seq":%d}' % (data[:-1], seq))


async def stream_raw(
    js: JetStreamContext, subject: str, *, from_seq: int = 1, follow: bool = True, batch: int = 1000
) -> AsyncIterator[list[RawEvent]]:
    """Batches of events on `subject` from `from_seq` on, in order.

    With `follow=False` it ends once the history is read; otherwise it waits for new events.
    """
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(from_seq, 1),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=60.0,
    )
    pull = await js.pull_subscribe(subject, stream=STREAM, config=config)
    info = await pull.consumer_info()
    try:
        pending = info.num_pending
        while follow or pending:
            try:
                messages = await pull.fetch(batch, timeout=5.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except nats.errors.Error as error:
                # A busy server may fail one pull request; the next one resumes where this left.
                if isinstance(error, nats.errors.ConnectionClosedError):
                    raise
                log.warning("fetch on %s failed, retrying: %r", subject, error)
                await asyncio.sleep(0.1)
                continue
            if not messages:  # nats-py may answer a pull that timed out with an empty batch.
                continue
            pending = messages[-1].metadata.num_pending
            events = [e for e in map(_raw_event, messages) if e is not None]
            if events:
                yield events
    finally:
        try:
            await pull.unsubscribe()
            await js.delete_consumer(STREAM, info.name)
        except Exception:  # The consumer expires by itself (inactive_threshold).
            pass


async def stream_events(
    js: JetStreamContext, subject: str, *, from_seq: int = 1, follow: bool = True, batch: int = 1000
) -> AsyncIterator[list[dict[str, Any]]]:
    """Like stream_raw, as decoded envelopes (each with its `stream_seq`)."""
    async for raw in stream_raw(js, subject, from_seq=from_seq, follow=follow, batch=batch):
        yield [json.loads(event.json) for event in raw]
