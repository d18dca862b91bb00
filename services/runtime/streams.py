"""Reading events from the stream in order: a task's history, or history then the live tail.

Each reader is its own ephemeral JetStream consumer starting at a stream sequence, so the
switch from history to live has no gap and no duplicate, and a reader only fetches more once
it has sent what it has: a slow viewer slows its own consumer, and JetStream is the buffer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from events import STREAM

log = logging.getLogger(__name__)


def _event_of(message: Msg) -> dict[str, Any] | None:
    try:
        event = json.loads(message.data)
    except ValueError:
        log.warning("skipping undecodable message at stream seq %s", message.metadata.sequence.stream)
        return None
    event["stream_seq"] = message.metadata.sequence.stream
    return event


async def stream_events(
    js: JetStreamContext, subject: str, *, from_seq: int = 1, follow: bool = True, batch: int = 256
) -> AsyncIterator[list[dict[str, Any]]]:
    """Batches of events (envelope + `stream_seq`) on `subject` from `from_seq` on, in order.

    With `follow=False` it ends once the history is read; otherwise it waits for new events.
    """
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(from_seq, 1),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=60.0,
    )
    pull = await js.pull_subscribe(subject, stream=STREAM, config=config)
    name = (await pull.consumer_info()).name
    try:
        pending = (await pull.consumer_info()).num_pending
        while follow or pending:
            try:
                messages = await pull.fetch(batch, timeout=5.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            pending = messages[-1].metadata.num_pending
            events = [e for e in map(_event_of, messages) if e is not None]
            if events:
                yield events
    finally:
        try:
            await pull.unsubscribe()
            await js.delete_consumer(STREAM, name)
        except Exception:  # The consumer expires by itself (inactive_threshold).
            pass
