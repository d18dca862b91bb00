"""A task's history, read back from the stream in order."""

from __future__ import annotations

from typing import Any

from nats.js import JetStreamContext

from events import task_subjects
from services.runtime.streams import stream_events


async def read_task_events(
    js: JetStreamContext, task_id: str, *, from_seq: int = 1, limit: int = 10_000
) -> list[dict[str, Any]]:
    """Every event of the task with stream sequence ≥ `from_seq`: envelopes plus `stream_seq`."""
    events: list[dict[str, Any]] = []
    async for batch in stream_events(js, task_subjects(task_id), from_seq=from_seq, follow=False):
        events.extend(batch)
        if len(events) >= limit:
            break
    return events[:limit]
