"""A task's history, read back from the stream in order."""

from __future__ import annotations

import json
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from events import STREAM, task_subjects


async def read_task_events(
    js: JetStreamContext, task_id: str, *, from_seq: int = 1, limit: int = 10_000
) -> list[dict[str, Any]]:
    """Every event of the task with stream sequence ≥ `from_seq`: envelopes plus `stream_seq`."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(from_seq, 1),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
    )
    pull = await js.pull_subscribe(task_subjects(task_id), stream=STREAM, config=config)
    try:
        pending = (await pull.consumer_info()).num_pending
        events: list[dict[str, Any]] = []
        while pending and len(events) < limit:
            try:
                batch = await pull.fetch(min(pending, 500), timeout=5.0)
            except nats.errors.TimeoutError:
                break
            for message in batch:
                event = json.loads(message.data)
                event["stream_seq"] = message.metadata.sequence.stream
                events.append(event)
                pending = message.metadata.num_pending
        return events[:limit]
    finally:
        info = await pull.consumer_info()
        await pull.unsubscribe()
        await js.delete_consumer(STREAM, info.name)
