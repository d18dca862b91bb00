"""The pull-requests service's reactions: each pushed turn (TaskCompleted) opens the task's pull
request, or updates it for a follow-up's turn; the decision is recorded with the consumer's
position, so a redelivered TaskCompleted changes nothing."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from eventsourcing.persistence import Tracking

from events import Envelope, TaskCompleted
from services.pull_requests.description import PullRequestText, pull_request_text
from services.pull_requests.domain import PullRequest
from services.pull_requests.github import GitHubError, GitHubHost, GitHubRepo
from services.runtime.consumer import Handler, Subscription
from services.runtime.handlers import declared_handlers, handles
from services.runtime.store import ServiceStore

log = logging.getLogger(__name__)

TaskEvents = Callable[[str], Awaitable[list[dict[str, Any]]]]
"""The task's envelopes (as dicts) on the stream, in order."""


class PullsApi(Protocol):
    async def default_branch(self, repo: GitHubRepo) -> str: ...
    async def open_pull_for(self, repo: GitHubRepo, branch: str) -> dict[str, Any] | None: ...
    async def create_pull(self, repo: GitHubRepo, **body: Any) -> dict[str, Any]: ...
    async def update_pull(self, repo: GitHubRepo, number: int, **body: Any) -> dict[str, Any]: ...
    async def files_changed(self, repo: GitHubRepo, base: str, head: str) -> list[str]: ...


class PullRequests:
    def __init__(self, store: ServiceStore, *, host: GitHubHost | None, api: PullsApi | None,
                 task_events: TaskEvents, public_url: str) -> None:
        self.store, self.host, self.api = store, host, api
        self.task_events = task_events
        self.public_url = public_url.rstrip("/")

    @handles(TaskCompleted)
    async def on_task_completed(self, envelope: Envelope, tracking: Tracking) -> None:
        """Open (or update) the task's pull request for this turn, unless it was decided before,
        the task asked for none, or its repo is not on the configured GitHub host."""
        turn = envelope.data.get("turn", 1)
        pull = self.store.get_task_aggregate(PullRequest, envelope.task_id)
        if pull is not None and turn in pull.turns_told:
            self.store.save_processed(tracking)
            return
        events = await self.task_events(envelope.task_id)
        submitted = next((e["data"] for e in events if e["type"] == "TaskSubmitted"), None)
        repo = self.host.repo_of(submitted["repo"]) if self.host and submitted else None
        if repo is None or self.api is None or not submitted.get("pull_request", True):
            self.store.save_processed(tracking)
            return
        pull = pull or PullRequest(envelope.task_id)
        try:
            await self._tell(pull, repo, submitted, events, envelope, turn)
        except GitHubError as error:
            log.warning("pull request of task %s, turn %d: %s", envelope.task_id, turn, error)
            pull.failed(str(error), turn=turn, cause=envelope.event_id)
        self.store.save_processed(tracking, pull)

    async def _tell(self, pull: PullRequest, repo: GitHubRepo, submitted: dict, events: list[dict],
                    envelope: Envelope, turn: int) -> None:
        assert self.api is not None
        branch = envelope.data["branch"]
        base = submitted.get("base_branch") or await self.api.default_branch(repo)
        text = await self._text(repo, envelope.task_id, events, base, branch)
        if pull.number is not None:
            await self.api.update_pull(repo, pull.number, title=text.title, body=text.body)
            pull.updated(turn=turn, cause=envelope.event_id)
            return
        draft = bool(submitted.get("draft", False))
        opened = await self._open_once(repo, branch, base, text, draft=draft)
        pull.opened(opened, head=branch, base=base, draft=draft, turn=turn, cause=envelope.event_id)

    async def _open_once(self, repo: GitHubRepo, branch: str, base: str, text: PullRequestText,
                         *, draft: bool) -> dict[str, Any]:
        """The branch's open pull request: found (a step retried after a crash opened it), else
        created; GitHub's 422 "already exists" (a race with that crash) finds it too."""
        assert self.api is not None
        if (existing := await self.api.open_pull_for(repo, branch)) is not None:
            return existing
        try:
            return await self.api.create_pull(repo, title=text.title, body=text.body, head=branch,
                                              base=base, draft=draft)
        except GitHubError as error:
            if error.pull_exists and (existing := await self.api.open_pull_for(repo, branch)) is not None:
                return existing
            raise

    async def _text(self, repo: GitHubRepo, task_id: str, events: list[dict], base: str, branch: str) -> PullRequestText:
        assert self.api is not None
        try:
            files = await self.api.files_changed(repo, base, branch)
        except GitHubError as error:  # The description says less; the pull request still opens.
            log.warning("files changed on %s not listed: %s", branch, error)
            files = []
        return pull_request_text(task_id, events, files=files, task_url=f"{self.public_url}/tasks/{task_id}")

    def handlers(self) -> dict[str, Handler]:
        """Event type -> handler, as declared (`@handles`)."""
        return declared_handlers(self)

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(event_type, handle) for event_type, handle in self.handlers().items()]
