"""`/api/tasks`: submit a task, the board, one task, its history."""

from __future__ import annotations

import secrets

from fastapi import APIRouter, HTTPException, Query

from events import TaskSubmitted
from services.gateway.context import GatewayDep
from services.gateway.domain import Submission
from services.gateway.history import read_task_events
from services.gateway.schemas import TaskCreate, TaskEvents, TaskPublic
from services.runtime.repo_url import RepoCredential, RepoUrl, RepoUrlError, parse_repo_url
from vm_agent.backends import available_backends

router = APIRouter(prefix="/api/tasks", tags=["tasks"])


@router.post("", status_code=201)
def submit_task(body: TaskCreate, gateway: GatewayDep) -> TaskPublic:
    """Record TaskSubmitted; the task runner takes it from there."""
    backends = available_backends()
    if body.agent not in backends:
        raise HTTPException(
            422, f"unknown agent {body.agent!r}; this install can run: {', '.join(sorted(backends))}"
        )
    submission = Submission(secrets.token_hex(8))
    repo = _checked_repo(body.repo, gateway)
    submitted = TaskSubmitted(
        repo=repo.url, prompt=body.prompt, agent=body.agent, base_branch=body.base_branch
    )
    submission.submit(submitted, actor="user")
    _save_with_credential(gateway, submission, repo.credential)
    return _from_submission(submission)


@router.get("")
def list_tasks(gateway: GatewayDep, limit: int = Query(200, ge=1, le=1000)) -> dict:
    return {"tasks": gateway.board.list(limit=limit)}


@router.get("/{task_id}")
def get_task(task_id: str, gateway: GatewayDep) -> TaskPublic:
    row = gateway.board.get(task_id)
    if row is not None:
        return TaskPublic(**row)
    # The projector may not have seen the submission yet; the gateway's own store has.
    submission = _submission(gateway, task_id)
    return _from_submission(submission)


@router.get("/{task_id}/events")
async def get_task_events(
    task_id: str, gateway: GatewayDep, from_seq: int = Query(1, ge=1)
) -> TaskEvents:
    events = await read_task_events(gateway.bus.js, task_id, from_seq=from_seq)
    if not events and gateway.board.get(task_id) is None:
        _submission(gateway, task_id)  # 404 for a task nobody submitted.
    return TaskEvents(task_id=task_id, events=events)


def _checked_repo(raw: str, gateway: GatewayDep) -> RepoUrl:
    """422 saying what to change unless `raw` is a usable repo URL of an allowed scheme."""
    try:
        return parse_repo_url(raw, allowed=gateway.settings.repo_schemes)
    except RepoUrlError as error:
        raise HTTPException(422, str(error)) from None


def _save_with_credential(gateway: GatewayDep, submission: Submission, credential: RepoCredential | None) -> None:
    """Record the submission, its repo credential sealed beforehand (the provisioner finds it as
    soon as it sees the task); a submission that could not be recorded leaves no credential."""
    if credential is not None:
        gateway.credentials.seal(submission.task_id, credential)
    try:
        gateway.store.save(submission)
    except BaseException:
        gateway.credentials.discard(submission.task_id)
        raise


def _submission(gateway: GatewayDep, task_id: str) -> Submission:
    try:
        submission = gateway.store.get_task_aggregate(Submission, task_id)
    except ValueError:
        submission = None
    if submission is None:
        raise HTTPException(404, f"no task {task_id!r}")
    return submission


def _from_submission(submission: Submission) -> TaskPublic:
    submitted = submission.submitted
    assert submitted is not None
    return TaskPublic(
        task_id=submission.task_id,
        state="queued",
        repo=submitted.repo,
        agent=submitted.agent,
        prompt=submitted.prompt,
        base_branch=submitted.base_branch,
        created_at=submission.submitted_at,
        updated_at=submission.submitted_at,
        last_event=TaskSubmitted.type,
    )
