"""`POST /api/tasks/{task_id}/cancel`: a person asks to stop a task; the task runner ends it."""

from __future__ import annotations

from eventsourcing.persistence import IntegrityError
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.context import GatewayDep, TaskIdDep, submission_or_404

router = APIRouter(prefix="/api/tasks", tags=["tasks"])

ENDED = ("completed", "failed", "cancelled")


class TaskCancel(BaseModel):
    """Why, optionally (kept with the cancel on the record)."""

    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=2000)


@router.post("/{task_id}/cancel", status_code=202)
def cancel_task(task_id: TaskIdDep, gateway: GatewayDep, body: TaskCancel | None = None) -> dict:
    """Record TaskCancelRequested (by the user); the task runner ends the task `cancelled`: at once
    if it waits in the queue, once its agent stopped if it runs. 404: no such task; 409: it ended."""
    submission = submission_or_404(gateway, task_id)
    row = gateway.board.get(task_id)
    if row is not None and row["state"] in ENDED:
        raise HTTPException(409, f"task {task_id} already ended ({row['state']}): there is nothing to cancel")
    new = not submission.cancel_requested
    submission.request_cancel(by="user", reason=body.reason if body else None)
    try:
        gateway.store.save(submission)
    except IntegrityError:  # Something else was recorded for this task meanwhile: the client retries.
        raise HTTPException(409, "the task changed at the same time; retry the cancel") from None
    return {"task_id": task_id, "state": "cancelling", "recorded_now": new}
