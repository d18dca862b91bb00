"""What the gateway's routes work with, built once at startup."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from events.envelope import task_id_problem

from projections.audit_log import AuditLog
from projections.task_board import TaskBoard
from services.gateway.limits import SubmitRateLimit, ViewerSlots
from services.runtime.bus import Bus
from services.runtime.credentials import CredentialVault
from services.runtime.heartbeat import HeartbeatBoard
from services.runtime.relay import Relay
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore
from services.gateway.domain import Submission


@dataclass
class Gateway:
    settings: Settings
    store: ServiceStore
    relay: Relay
    bus: Bus
    board: TaskBoard
    audit: AuditLog
    heartbeats: HeartbeatBoard
    submit_limit: SubmitRateLimit = field(init=False)
    viewers: ViewerSlots = field(init=False)
    credentials: CredentialVault = field(init=False)
    """Where a repo URL's credential is sealed for its task (never recorded)."""

    def __post_init__(self) -> None:
        self.submit_limit = SubmitRateLimit(self.settings.submit_rate_per_s, self.settings.submit_burst)
        self.viewers = ViewerSlots(self.settings.max_viewers)
        self.credentials = CredentialVault.of(self.settings)


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def valid_task_id(task_id: str) -> str:
    """The `{task_id}` path parameter, or a 404 saying what a task id looks like (never a subject
    wildcard such as `*` or `>`, which would reach other tasks' events)."""
    problem = task_id_problem(task_id)
    if problem is not None:
        raise HTTPException(404, f"no such task: {problem}")
    return task_id


TaskIdDep = Annotated[str, Depends(valid_task_id)]


def submission_or_404(gateway: Gateway, task_id: str) -> Submission:
    """The task's Submission (the gateway's record of it); 404 for a task nobody submitted."""
    try:
        submission = gateway.store.get_task_aggregate(Submission, task_id)
    except ValueError:
        submission = None
    if submission is None:
        raise HTTPException(404, f"no task {task_id!r}")
    return submission
