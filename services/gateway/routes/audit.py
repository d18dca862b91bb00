"""`/api/audit`: the whole event history for auditors, filtered, paged, exported."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator

from events import EVENT_TYPES
from projections.audit_log import MAX_PAGE, AuditLog
from projections.audit_views import tasks_with_gaps, timeline
from services.gateway.context import GatewayDep, TaskIdDep
from services.gateway.limits import MAX_STREAM_SEQ

router = APIRouter(prefix="/api/audit", tags=["audit"])


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        raise ValueError("give a timezone, e.g. 2026-11-20T10:00:00Z")
    return value


Time = Annotated[datetime | None, AfterValidator(_aware), Query(description="ISO-8601 with timezone")]


def encode_cursor(stream_seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{stream_seq}".encode()).decode()


def decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        kind, _, seq = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        if kind != "seq" or not 0 <= int(seq) <= MAX_STREAM_SEQ:
            raise ValueError
        return int(seq)
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(422, "cursor is not one this API gave out; start without it") from None


def _check_type(type: str | None) -> None:
    if type is not None and type not in EVENT_TYPES:
        raise HTTPException(422, f"unknown event type {type!r}; known: {', '.join(sorted(EVENT_TYPES))}")


@router.get("/events")
def audit_events(
    gateway: GatewayDep,
    task_id: str | None = None,
    type: str | None = None,
    actor: str | None = None,
    since: Time = None,
    until: Time = None,
    limit: Annotated[int, Query(ge=1, description=f"page size, capped at {MAX_PAGE}")] = 100,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Events in stream order matching every filter; follow `next_cursor` for the next page."""
    _check_type(type)
    limit = min(limit, MAX_PAGE)
    page = gateway.audit.query(task_id=task_id, type=type, actor=actor, since=since, until=until,
                               after_seq=decode_cursor(cursor), limit=limit)
    next_cursor = encode_cursor(page[-1]["stream_seq"]) if len(page) == limit else None
    return {"events": page, "next_cursor": next_cursor}


@router.get("/tasks/{task_id}/timeline")
def audit_timeline(task_id: TaskIdDep, gateway: GatewayDep) -> dict[str, Any]:
    found = timeline(gateway.audit, task_id)
    if found is None:
        raise HTTPException(404, f"no events for task {task_id!r} in the audit log")
    return found


@router.get("/gaps")
def audit_gaps(gateway: GatewayDep, since: Time = None, until: Time = None) -> dict[str, Any]:
    """Tasks whose flow had a late or missing handoff in the time range."""
    return {"tasks": tasks_with_gaps(gateway.audit, since=since, until=until)}


@router.get("/export")
def audit_export(
    gateway: GatewayDep,
    task_id: str | None = None,
    type: str | None = None,
    since: Time = None,
    until: Time = None,
) -> StreamingResponse:
    """Every matching event as NDJSON, streamed page by page (for very large histories)."""
    _check_type(type)
    lines = _ndjson(gateway.audit, task_id=task_id, type=type, since=since, until=until)
    return StreamingResponse(lines, media_type="application/x-ndjson")


def _ndjson(log: AuditLog, **filters: Any) -> Iterator[bytes]:
    after = 0
    while page := log.query(after_seq=after, limit=MAX_PAGE, **filters):
        yield b"".join(json.dumps(event).encode() + b"\n" for event in page)
        after = page[-1]["stream_seq"]
