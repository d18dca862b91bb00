"""`POST /api/tasks/{task_id}/messages`: a person's follow-up prompt, run as the task's next turn."""

from __future__ import annotations

from eventsourcing.persistence import IntegrityError
from fastapi import APIRouter, HTTPException

from events import FollowUpSubmitted
from services.gateway.context import GatewayDep, TaskIdDep, submission_or_404
from services.gateway.routes.tasks import _refuse_what_the_bus_cannot_carry
from services.gateway.schemas import FollowUpCreate

router = APIRouter(prefix="/api/tasks", tags=["messages"])

@router.post("/{task_id}/messages", status_code=202)
def send_follow_up(task_id: TaskIdDep, body: FollowUpCreate, gateway: GatewayDep) -> dict:
    """Record FollowUpSubmitted; the task runner delivers it as the next turn of the task's agent
    session (queued until the running turn is pushed; on a re-provisioned workspace, the session
    restored, once the task's was released). 404: no such task; 409: the task cannot take one (it
    failed or was cancelled)."""
    submission = submission_or_404(gateway, task_id)
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
