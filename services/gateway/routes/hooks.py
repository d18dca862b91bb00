"""`POST /api/hooks/github`: GitHub's review comments and failed checks on a Baton pull request
come back as follow-ups of its task (the agent's next turn).

Open without the API token (GitHub cannot send it) but verified: X-Hub-Signature-256 must be the
HMAC-SHA256 of the raw body with BATON_GITHUB_WEBHOOK_SECRET (401 otherwise, nothing recorded).
Each delivery (X-GitHub-Delivery) is recorded with the follow-up it made, in one transaction, so
a redelivery is answered without a second follow-up.
"""

from __future__ import annotations

import json
import uuid

from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import IntegrityError
from fastapi import APIRouter, HTTPException, Request

from services.gateway.context import GatewayDep
from services.gateway.domain import Submission
from services.gateway.routes.messages import _refuse_when_it_cannot_take_one
from services.pull_requests.github import GitHubClient, GitHubError, GitHubHost, GitHubRepo, github_token
from services.pull_requests.webhook import Feedback, feedback_of, signature_valid

router = APIRouter(prefix="/api/hooks", tags=["hooks"])
_DELIVERY_NAMESPACE = uuid.UUID("0b7f3c52-3f0e-4d59-9d8e-2f4f0e6b1a11")


class GitHubDelivery(Aggregate):
    """One webhook delivery the gateway acted on (its id is GitHub's X-GitHub-Delivery)."""

    @staticmethod
    def create_id(delivery_id: str) -> uuid.UUID:
        return uuid.uuid5(_DELIVERY_NAMESPACE, delivery_id)

    @event("Handled")
    def __init__(self, delivery_id: str, task_id: str) -> None:
        self.delivery_id, self.task_id = delivery_id, task_id


@router.post("/github", status_code=202)
async def github_hook(request: Request, gateway: GatewayDep) -> dict:
    """A signed delivery: feedback on a Baton PR becomes FollowUpSubmitted (actor `github:<login>`);
    anything else is acknowledged and ignored. 401: bad or missing signature; 404: hooks are off."""
    secret = gateway.settings.github_webhook_secret
    if not secret:
        raise HTTPException(404, "GitHub webhooks are off: set BATON_GITHUB_WEBHOOK_SECRET")
    body = await request.body()
    if not signature_valid(secret, body, request.headers.get("X-Hub-Signature-256")):
        raise HTTPException(401, "X-Hub-Signature-256 does not match this body and BATON_GITHUB_WEBHOOK_SECRET")
    delivery_id = request.headers.get("X-GitHub-Delivery", "").strip()
    if not delivery_id:
        raise HTTPException(400, "X-GitHub-Delivery is missing")
    if GitHubDelivery.create_id(delivery_id) in gateway.store.repository:
        return {"delivery": delivery_id, "state": "already handled"}
    try:
        payload = json.loads(body)
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    event_name = request.headers.get("X-GitHub-Event", "")
    feedback = feedback_of(event_name, payload, head_ref=await _head_ref_of_comment(gateway, event_name, payload))
    if feedback is None:
        return {"delivery": delivery_id, "state": f"ignored: {event_name or 'no event'} is no feedback on a Baton PR"}
    return _record_follow_up(gateway, delivery_id, feedback, payload)


def _record_follow_up(gateway: GatewayDep, delivery_id: str, feedback: Feedback, payload: dict) -> dict:
    try:
        submission = gateway.store.get_task_aggregate(Submission, feedback.task_id)
    except ValueError:
        submission = None
    if submission is None or not _of_the_tasks_repo(gateway, submission, payload):
        return {"delivery": delivery_id, "state": f"ignored: no task {feedback.task_id} on this repo here"}
    _refuse_when_it_cannot_take_one(gateway, feedback.task_id, cancelling=submission.cancel_requested)
    submission.follow_up(feedback.prompt, actor=feedback.actor)
    try:
        gateway.store.save(submission, GitHubDelivery(delivery_id, feedback.task_id))
    except IntegrityError:  # The same delivery (or another follow-up) was recorded meanwhile.
        raise HTTPException(409, "the task changed at the same time; redeliver the webhook") from None
    return {"delivery": delivery_id, "task_id": feedback.task_id, "state": "follow-up recorded"}


def _of_the_tasks_repo(gateway: GatewayDep, submission: Submission, payload: dict) -> bool:
    """The delivery is about the task's own repo (a branch named `baton/<id>` elsewhere is not it)."""
    host = GitHubHost.of(gateway.settings)
    repo = host.repo_of(submission.submitted.repo) if host and submission.submitted else None
    full_name = ((payload.get("repository") or {}).get("full_name") or "").lower()
    return repo is None or not full_name or full_name == f"{repo.owner}/{repo.name}".lower()


async def _head_ref_of_comment(gateway: GatewayDep, event_name: str, payload: dict) -> str | None:
    """An `issue_comment` on a pull request names no branch: ask the API (None if it cannot)."""
    issue = payload.get("issue") or {}
    host = GitHubHost.of(gateway.settings)
    if event_name != "issue_comment" or not issue.get("pull_request") or host is None:
        return None
    owner, _, name = ((payload.get("repository") or {}).get("full_name") or "").partition("/")
    client = GitHubClient(host.api_url, github_token(gateway.settings) or "")
    try:
        return await client.head_ref(GitHubRepo(owner, name), int(issue["number"]))
    except (GitHubError, KeyError, ValueError):
        return None
    finally:
        await client.aclose()
