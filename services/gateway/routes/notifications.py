"""`/api/notifications`: the webhook notifications delivered or given up, newest first (from the
audit log, which the projector keeps from the stream like the board)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from events import NotificationDelivered, NotificationFailed
from events.envelope import task_id_problem
from projections.audit_log import MAX_PAGE, AuditLog
from services.gateway.context import GatewayDep

router = APIRouter(prefix="/api/notifications", tags=["notifications"])
OUTCOMES = {NotificationDelivered.type: "delivered", NotificationFailed.type: "failed"}


@router.get("")
def recent_notifications(
    gateway: GatewayDep,
    task_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> dict[str, Any]:
    """The latest `limit` outcomes (of one task if `task_id`): endpoint, event, attempts, reason."""
    if task_id is not None and (problem := task_id_problem(task_id)) is not None:
        raise HTTPException(422, problem)
    found = [event for type_ in OUTCOMES for event in _all_of(gateway.audit, type_, task_id)]
    found.sort(key=lambda event: event["stream_seq"], reverse=True)
    return {"notifications": [_outcome(event) for event in found[:limit]]}


def _all_of(audit: AuditLog, type_: str, task_id: str | None) -> list[dict[str, Any]]:
    """Every event of `type_` in the audit log (of the task), page by page in stream order."""
    events: list[dict[str, Any]] = []
    while page := audit.query(type=type_, task_id=task_id, after_seq=events[-1]["stream_seq"] if events else 0,
                              limit=MAX_PAGE):
        events += page
    return events


def _outcome(event: dict[str, Any]) -> dict[str, Any]:
    data = event["data"]
    return {"task_id": event["task_id"], "endpoint": data["endpoint"], "event_type": data["event_type"],
            "event_id": data["event_id"], "delivery_id": data["delivery_id"], "outcome": OUTCOMES[event["type"]],
            "attempts": data["attempts"], "reason": data.get("reason"), "at": event["occurred_at"]}
