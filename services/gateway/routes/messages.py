"""`POST /api/tasks/{task_id}/messages`: a person's follow-up prompt, run as the task's next turn."""

from __future__ import annotations

from datetime import UTC, datetime

from eventsourcing.persistence import IntegrityError
from fastapi import APIRouter, HTTPException

from events import FollowUpSubmitted
from services.gateway.context import GatewayDep, TaskIdDep
from services.gateway.domain import Submission
from services.gateway.routes.tasks import _refuse_what_the_bus_cannot_carry
from services.gateway.schemas import FollowUpCreate

router = APIRouter(prefix="/api/tasks", tags=["messages"])

RELEASE_MARGIN_S = 10.0
"""A completed task's workspace is taken as released this long before BATON_LINGER_S is up (the
follow-up must still reach its vm_agent)."""


@router.post("/{task_id}/messages", status_code=202)
def send_follow_up(task_id: TaskIdDep, body: FollowUpCreate, gateway: GatewayDep) -> dict:
    """Record FollowUpSubmitted; the task runner delivers it as the next turn of the task's agent
    session (queued until the running turn is pushed). 404: no such task; 409: the task cannot
    take one (it failed, was cancelled, or completed and its workspace was released)."""
    try:
        submission = gateway.store.get_task_aggregate(Submission, task_id)
    except ValueError:
        submission = None
    if submission is None:
        raise HTTPException(404, f"no task {task_id!r}")
    _refuse_when_it_cannot_take_one(gateway, task_id, cancelling=submission.cancel_requested)
    submitted = FollowUpSubmitted(prompt=body.prompt)
    _refuse_what_the_bus_cannot_carry(gateway, task_id, submitted)  # type: ignore[arg-type]
    submission.follow_up(body.prompt, actor="user")
    try:
        gateway.store.save(submission)
    except IntegrityError:  # Something else was recorded for this task meanwhile: the client retries.
        raise HTTPException(409, "the task changed at the same time; retry the follow-up") from None
    return {"task_id": task_id, "state": "follow-up recorded"}


def _refuse_when_it_cannot_take_one(gateway: GatewayDep, task_id: str, *, cancelling: bool) -> None:
    row = gateway.board.get(task_id)
    state = row["state"] if row else None
    if cancelling or state == "cancelled":
        raise HTTPException(409, f"task {task_id} was cancelled: it takes no follow-up; submit a new task")
    if state == "failed":
        raise HTTPException(409, f"task {task_id} failed ({row['reason']}): it takes no follow-up; submit a new task")
    if state == "completed" and row and row.get("updated_at"):
        idle_s = (datetime.now(UTC) - datetime.fromisoformat(row["updated_at"])).total_seconds()
        if idle_s > max(gateway.settings.linger_s - RELEASE_MARGIN_S, 0.0):
            raise HTTPException(409, (
                f"task {task_id} completed {idle_s:.0f}s ago and its workspace was released "
                f"(BATON_LINGER_S={gateway.settings.linger_s:.0f}): follow-ups after the workspace is "
                "released come in a later release; submit a new task on its branch"))
