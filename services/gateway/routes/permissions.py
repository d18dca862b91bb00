"""`/api/tasks/{task_id}/permissions`: a task's permission requests, and a person's answers."""

from __future__ import annotations

from eventsourcing.persistence import IntegrityError
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.context import GatewayDep, TaskIdDep, submission_or_404
from services.gateway.permissions import AnswerRefused, check_answer, permission_requests

router = APIRouter(prefix="/api/tasks", tags=["permissions"])


class PermissionAnswerCreate(BaseModel):
    """`POST /api/tasks/{task_id}/permissions/{request_id}`: the option a person chose."""

    model_config = ConfigDict(extra="forbid")
    option_id: str = Field(min_length=1, max_length=500)


@router.get("/{task_id}/permissions")
async def list_permissions(task_id: TaskIdDep, gateway: GatewayDep) -> dict:
    """Every permission request of the task in order, each with its answer (null while open)."""
    submission_or_404(gateway, task_id)
    requests = await permission_requests(gateway.bus.js, task_id)
    return {"task_id": task_id, "permissions": requests}


@router.post("/{task_id}/permissions/{request_id}", status_code=202)
async def answer_permission(task_id: TaskIdDep, request_id: str, body: PermissionAnswerCreate,
                            gateway: GatewayDep) -> dict:
    """Record the person's answer (PermissionAnswerGiven); the agent gets it through the task
    runner and its vm_agent, which records PermissionAnswered."""
    submission = submission_or_404(gateway, task_id)
    requests = await permission_requests(gateway.bus.js, task_id)
    try:
        new = check_answer(requests, submission.permission_answers, request_id, body.option_id)
    except AnswerRefused as refused:
        raise HTTPException(refused.status, str(refused)) from None
    if new:
        asked = next(r for r in requests if r["request_id"] == request_id)
        submission.answer_permission(request_id, body.option_id, actor="user", cause=asked["event_id"])
        try:
            gateway.store.save(submission)
        except IntegrityError:  # Another answer to this task was recorded meanwhile.
            raise HTTPException(409, "another answer was recorded at the same time; reload and retry") from None
    return {"task_id": task_id, "request_id": request_id, "option_id": body.option_id, "recorded_now": new}
