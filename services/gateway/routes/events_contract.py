"""`/api/events/asyncapi.json`: the event contract other services code against (AsyncAPI 3)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from events.asyncapi import asyncapi_document

router = APIRouter(prefix="/api/events", tags=["events"])


@router.get("/asyncapi.json")
def asyncapi() -> dict[str, Any]:
    """Every event's channel, envelope schema, emitter and promise, generated from `events/`."""
    return asyncapi_document()
