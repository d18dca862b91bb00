"""`/api/tasks`: submit a task, the board, one task, its history."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from events import TaskSubmitted, envelope_for
from events.envelope import new_task_id
from services.gateway.context import GatewayDep, TaskIdDep, submission_or_404
from services.gateway.domain import Submission
from services.gateway.history import read_task_events
from services.gateway.limits import BUS_HEADER_HEADROOM, MAX_STREAM_SEQ
from services.gateway.schemas import TaskCreate, TaskEvents, TaskPublic
from services.provisioner.providers import provider_problem
from services.runtime.repo_url import RepoCredential, RepoUrl, RepoUrlError, parse_repo_url
from services.runtime.agent_secrets import agent_environ
from vm_agent.backends import refusal

router = APIRouter(prefix="/api/tasks", tags=["tasks"])


async def within_submit_rate(request: Request, gateway: GatewayDep) -> None:
    """429 with Retry-After past the client's token bucket (keyed by its address: every client of
    an install shares one API token, so the address is what tells them apart)."""
    client = request.client.host if request.client else "unknown"
    wait_s = gateway.submit_limit.take(client)
    if wait_s:
        message, headers = gateway.submit_limit.refusal(wait_s)
        raise HTTPException(429, message, headers=headers)


@router.post("", status_code=201, dependencies=[Depends(within_submit_rate)])
def submit_task(body: TaskCreate, gateway: GatewayDep) -> TaskPublic:
    """Record TaskSubmitted; the task runner takes it from there."""
    # Refused now, with the command that fixes it, rather than a task that fails later.
    why_not = refusal(body.agent, gateway.settings.agents_root, agent_environ(gateway.settings))
    if why_not is not None:
        raise HTTPException(422, why_not)
    provider = body.provider or gateway.settings.provider
    if (provider_not_usable := provider_problem(provider, gateway.settings)) is not None:
        raise HTTPException(422, provider_not_usable)
    submission = Submission(new_task_id())
    repo = _checked_repo(body.repo, gateway)
    submitted = TaskSubmitted(
        repo=repo.url, prompt=body.prompt, agent=body.agent, base_branch=body.base_branch,
        permission_policy=body.permission_policy, provider=provider,
        pull_request=body.pull_request, draft=body.draft,
    )
    _refuse_what_the_bus_cannot_carry(gateway, submission.task_id, submitted)
    submission.submit(submitted, actor="user")
    _save_with_credential(gateway, submission, repo.credential)
    return _from_submission(submission)


@router.get("")
def list_tasks(gateway: GatewayDep, limit: int = Query(200, ge=1, le=1000)) -> dict:
    return {"tasks": gateway.board.list(limit=limit)}


@router.get("/{task_id}")
def get_task(task_id: TaskIdDep, gateway: GatewayDep) -> TaskPublic:
    row = gateway.board.get(task_id)
    if row is not None:
        return TaskPublic(**row)
    # The projector may not have seen the submission yet; the gateway's own store has.
    submission = submission_or_404(gateway, task_id)
    return _from_submission(submission)


@router.get("/{task_id}/events")
async def get_task_events(
    task_id: TaskIdDep, gateway: GatewayDep, from_seq: int = Query(1, ge=1, le=MAX_STREAM_SEQ),
    before_seq: int | None = Query(None, ge=1, le=MAX_STREAM_SEQ), last: int | None = Query(None, ge=1, le=10_000),
    exclude: str = "",
) -> TaskEvents:
    """The task's history (from_seq ≤ stream_seq < before_seq, `exclude`d types left out); with
    `last=N` only its newest N: the web UI reads a long task's last screenful, then pages back."""
    events = await read_task_events(gateway.bus.js, task_id, from_seq=from_seq, before_seq=before_seq, last=last,
                                    exclude=frozenset(t for t in exclude.split(",") if t))
    if not events and gateway.board.get(task_id) is None:
        submission_or_404(gateway, task_id)  # 404 for a task nobody submitted.
    return TaskEvents(task_id=task_id, events=events)


def _refuse_what_the_bus_cannot_carry(gateway: GatewayDep, task_id: str, submitted: TaskSubmitted) -> None:
    """413 naming the limit when the TaskSubmitted envelope would not fit one NATS message (the
    relay could never publish it, and every later task would wait behind it)."""
    max_payload = gateway.bus.nc.max_payload
    limit = max_payload - BUS_HEADER_HEADROOM
    size = len(envelope_for(submitted, task_id=task_id, actor="user").to_json())
    if size > limit:
        raise HTTPException(413, (
            f"this task would be a {size:,}-byte event and the bus carries at most {limit:,} bytes "
            f"(NATS max_payload {max_payload:,} less {BUS_HEADER_HEADROOM:,} for headers): shorten "
            "the prompt (in JSON each control character takes 6 bytes) or put the material in the repo"))


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
        permission_policy=submitted.permission_policy,
        created_at=submission.submitted_at,
        updated_at=submission.submitted_at,
        last_event=TaskSubmitted.type,
    )
