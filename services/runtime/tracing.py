"""OpenTelemetry traces of tasks: one trace per task, one span per handoff, over OTLP.

The trace and span ids are derived from what every envelope already carries: the trace id from
`task_id`, a span's id from its event's `event_id`, its parent's from `causation_id`. So a task's
whole path is one trace across every service and restart, and no envelope needs a new field. A
span runs from the event that caused it to the event (`TaskSubmitted`, the POST, is the root).

The gateway follows the audit log (stream order) and exports each new event's span when
OTEL_EXPORTER_OTLP_ENDPOINT is set; the exporter reads the standard OTEL_* variables.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from projections.audit_log import MAX_PAGE, AuditLog
from services.runtime.metrics import REMEMBERED_EVENTS, BoundedDict

log = logging.getLogger(__name__)
ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"
UNTRACED_TYPES = frozenset({"AgentOutput"})
"""Too many to be spans: an event they cause hangs from their own nearest traced cause."""
POLL_S = 1.0
_SCOPE = InstrumentationScope("baton.handoffs")


def trace_id_of(task_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"trace:{task_id}".encode()).digest()[:16], "big") or 1


def span_id_of(event_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"span:{event_id}".encode()).digest()[:8], "big") or 1


def _context(task_id: str, event_id: str) -> SpanContext:
    return SpanContext(trace_id_of(task_id), span_id_of(event_id), is_remote=False,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED))


def _nanos(value: str) -> int:
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)


class HandoffSpans:
    """Turns envelopes, in stream order, into finished spans (one per traced event)."""

    def __init__(self) -> None:
        # event_id -> (the event_id its span stands for, when it happened in ns)
        self._seen: BoundedDict = BoundedDict(REMEMBERED_EVENTS)
        self._resources: dict[str, Resource] = {}

    def spans_of(self, envelopes: Iterable[Mapping[str, Any]]) -> list[ReadableSpan]:
        return [span for envelope in envelopes if (span := self.span_of(envelope)) is not None]

    def span_of(self, envelope: Mapping[str, Any]) -> ReadableSpan | None:
        """The span of this event (None for an untraced type), from its cause's time to its own."""
        at, cause = _nanos(envelope["occurred_at"]), envelope.get("causation_id")
        parent_event, parent_at = self._seen.get(cause, (cause, at)) if cause else (None, at)
        if envelope["type"] in UNTRACED_TYPES:
            self._seen[envelope["event_id"]] = (parent_event, parent_at)
            return None
        self._seen[envelope["event_id"]] = (envelope["event_id"], at)
        task_id = envelope["task_id"]
        return ReadableSpan(
            name=envelope["type"],
            context=_context(task_id, envelope["event_id"]),
            parent=_context(task_id, parent_event) if parent_event else None,
            resource=self._resource(envelope.get("actor", "baton")),
            attributes={"baton.task_id": task_id, "baton.event_id": envelope["event_id"],
                        "baton.event_type": envelope["type"]},
            kind=SpanKind.SERVER if parent_event is None else SpanKind.INTERNAL,
            start_time=min(parent_at, at), end_time=at, instrumentation_scope=_SCOPE,
        )

    def _resource(self, actor: str) -> Resource:
        if actor not in self._resources:
            self._resources[actor] = Resource.create({"service.name": f"baton-{actor}", "service.namespace": "baton"})
        return self._resources[actor]


def tracing_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    return bool(environ.get(ENDPOINT_VARIABLE) or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def otlp_processor() -> SpanProcessor:
    """A batching processor exporting over OTLP/HTTP, configured by the standard OTEL_* variables."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return BatchSpanProcessor(OTLPSpanExporter())


async def export_task_traces(read_after: Callable[[int], list[dict[str, Any]]], start_after: int,
                             processor: SpanProcessor, *, poll_s: float = POLL_S,
                             wait: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Follow the audit log (`read_after(stream_seq)` gives the next records in order) from
    `start_after`, handing each event's span to `processor`. A failed read is retried; it never
    stops the gateway."""
    spans, position = HandoffSpans(), start_after
    try:
        while True:
            try:
                while records := await asyncio.to_thread(read_after, position):
                    for span in spans.spans_of(records):
                        processor.on_end(span)
                    position = records[-1]["stream_seq"]
            except Exception as error:  # The read model briefly unreadable: the next poll retries.
                log.warning("traces: could not read the audit log after %s: %s", position, error)
            await wait(poll_s)
    finally:
        await asyncio.to_thread(processor.shutdown)


AUDIT_CONSUMER = "projector-all"
"""The projector's audit-log consumer (its reader over every event): where
the log ended when the gateway started, so a restart does not export the history again."""


def handoff_trace_loops(audit: AuditLog) -> list[Awaitable[None]]:
    """The gateway's loop exporting task traces, or none when no OTLP endpoint is set."""
    if not tracing_enabled():
        return []
    return [export_task_traces(lambda after: audit.query(after_seq=after, limit=MAX_PAGE),
                               audit.position(AUDIT_CONSUMER), otlp_processor())]
