"""Where `baton audit verify` and `rebuild` read the truth from: the stream and every producer's store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from events.envelope import STREAM_SUBJECTS
from services.registry import EVENT_PRODUCERS
from services.runtime.relay import RELAY_TRACKING
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore, envelope_of, sqlite_env, store_env
from services.runtime.streams import stream_events

PRODUCERS = EVENT_PRODUCERS
AUDIT_CONSUMER = "projector-all"


async def stream_history(js: JetStreamContext) -> list[tuple[int, dict[str, Any]]]:
    """Every event on the stream, in order, as (stream_seq, envelope)."""
    history = []
    async for batch in stream_events(js, STREAM_SUBJECTS[0], follow=False, batch=1000):
        history += [(event.pop("stream_seq"), event) for event in batch if _is_envelope(event)]
    return history


def _is_envelope(event: dict[str, Any]) -> bool:
    # Garbage on the stream (dead-lettered by every consumer) is not an event.
    return all(key in event for key in ("event_id", "type", "task_id", "occurred_at", "actor"))


def relayed_envelopes(settings: Settings) -> Iterator[tuple[str, dict[str, Any]]]:
    """(source, envelope) for every event each producer's store has relayed to the stream."""
    for name in PRODUCERS:
        yield from _relayed(ServiceStore(name, store_env(settings, name)), name)
    for db in sorted((settings.data_dir / "vm_agents").glob("*/events.sqlite")):
        yield from _relayed(ServiceStore("vm_agent", sqlite_env(db)), f"vm_agent {Path(db).parent.name}")


def _relayed(store: ServiceStore, source: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        position = store.process_recorder.max_tracking_id(RELAY_TRACKING) or 0
        start = 0
        while batch := store.process_recorder.select_notifications(
            start, 1000, stop=position, inclusive_of_start=False
        ):
            for notification in batch:
                envelope = envelope_of(store.mapper.to_domain_event(notification))
                if envelope is not None:
                    yield source, envelope.model_dump(mode="json")
            start = batch[-1].id
    finally:
        store.close()
