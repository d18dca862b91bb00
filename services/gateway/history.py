"""A task's history, read back from the stream in order: all of it, or a window of it."""

from __future__ import annotations

from typing import Any

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from events import STREAM, task_subjects
from events.catalog import EVENT_TYPES
from events.envelope import SUBJECT_PREFIX
from services.runtime.streams import stream_events


async def read_task_events(
    js: JetStreamContext, task_id: str, *, from_seq: int = 1, before_seq: int | None = None,
    last: int | None = None, exclude: frozenset[str] = frozenset(), limit: int = 10_000,
) -> list[dict[str, Any]]:
    """The task's events with from_seq ≤ stream_seq < before_seq and a type not in `exclude`
    (envelopes plus `stream_seq`), at most `limit`; with `last`, only the newest `last` of them.

    Left-out types are filtered by JetStream, so a task's few handoffs come back at once however
    much output lies between them; `last` starts the read where the newest `last` begin."""
    subjects = _subjects(task_id, exclude)
    if not subjects:
        return []  # every type left out (an empty filter would be no filter at all)
    if last is not None:
        from_seq = max(from_seq, await start_of_last(js, subjects, last, before_seq=before_seq))
    events: list[dict[str, Any]] = []
    async for batch in stream_events(js, subjects, from_seq=from_seq, follow=False):
        if before_seq is not None and batch[-1]["stream_seq"] >= before_seq:
            events.extend(e for e in batch if e["stream_seq"] < before_seq)
            break
        events.extend(batch)
        if len(events) >= limit:
            break
    return events[:limit]


def _subjects(task_id: str, exclude: frozenset[str]) -> str | list[str]:
    if not exclude:
        return task_subjects(task_id)
    return [f"{SUBJECT_PREFIX}.{task_id}.{kind}.>" for kind in EVENT_TYPES if kind not in exclude]


async def start_of_last(js: JetStreamContext, subjects: str | list[str], count: int, *,
                        before_seq: int | None = None) -> int:
    """The stream seq from which there are `count` events on `subjects` before `before_seq` (1 if
    fewer): found by bisecting on what a consumer starting there would have pending, which
    JetStream counts from its subject index without reading a message."""
    end = before_seq or (await js.stream_info(STREAM)).state.last_seq + 1
    beyond = 0 if before_seq is None else await _pending_from(js, subjects, end)
    if await _pending_from(js, subjects, 1) - beyond <= count:
        return 1
    lo, hi, step = 1, end, count  # pending(lo) - beyond ≥ count > pending(hi) - beyond
    while end - step > lo:  # the newest events are usually close together: look near the end first
        found = await _pending_from(js, subjects, end - step) - beyond
        if found == count:
            return end - step  # exactly: a read from here starts at the first of them
        if found > count:
            lo = end - step
            break
        hi, step = end - step, step * 4
    while hi - lo > 1:
        mid = (lo + hi) // 2
        found = await _pending_from(js, subjects, mid) - beyond
        if found == count:
            return mid
        lo, hi = (mid, hi) if found > count else (lo, mid)
    return lo


async def _pending_from(js: JetStreamContext, subjects: str | list[str], seq: int) -> int:
    """How many messages on `subjects` the stream holds from `seq` on."""
    many = not isinstance(subjects, str)
    config = ConsumerConfig(
        filter_subject=None if many else subjects, filter_subjects=subjects if many else None,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq, ack_policy=AckPolicy.NONE,
        inactive_threshold=5.0, mem_storage=True,
    )
    info = await js.add_consumer(STREAM, config=config)
    try:
        return info.num_pending or 0
    finally:
        await js.delete_consumer(STREAM, info.name)
