"""The pull-requests service's decisions with an in-memory GitHub, and the webhook's reading."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any

from eventsourcing.persistence import Tracking

from events import TaskCompleted, envelope_for
from services.pull_requests.domain import PullRequest
from services.pull_requests.github import GitHubError, GitHubHost, GitHubRepo, token_credential
from services.pull_requests.handlers import PullRequests
from services.pull_requests.webhook import feedback_of, signature_valid
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore

HOST = GitHubHost(host="github.com", scheme="https", api_url="https://api.github.com")
REPO = "https://github.com/acme/widgets.git"


class InMemoryPulls:
    def __init__(self, *, refuse: GitHubError | None = None, lose_answer: bool = False) -> None:
        self.pulls: list[dict[str, Any]] = []
        self.refuse, self.lose_answer = refuse, lose_answer

    async def default_branch(self, repo: GitHubRepo) -> str:
        return "trunk"

    async def open_pull_for(self, repo: GitHubRepo, branch: str) -> dict[str, Any] | None:
        return next((p for p in self.pulls if p["head"] == branch), None)

    async def create_pull(self, repo: GitHubRepo, **body: Any) -> dict[str, Any]:
        if self.refuse:
            raise self.refuse
        pull = {**body, "number": len(self.pulls) + 1, "html_url": f"https://github.com/acme/widgets/pull/{len(self.pulls) + 1}"}
        self.pulls.append(pull)
        if self.lose_answer:  # The process died before it heard the answer.
            self.lose_answer = False
            raise RuntimeError("killed")
        return pull

    async def update_pull(self, repo: GitHubRepo, number: int, **body: Any) -> dict[str, Any]:
        self.pulls[number - 1].update(body)
        return self.pulls[number - 1]

    async def files_changed(self, repo: GitHubRepo, base: str, head: str) -> list[str]:
        return ["a.txt"]


def _events(task: str, **submitted: Any) -> list[dict]:
    return [{"type": "TaskSubmitted", "data": {"repo": REPO, "prompt": "add a.txt\nmore", "agent": "shell", **submitted}},
            {"type": "PromptDelivered", "data": {}},
            {"type": "AgentOutput", "data": {"stream": "stdout", "text": "wrote a.txt", "seq": 1}},
            {"type": "UsageRecorded", "data": {"source": "prompt_response", "input_tokens": 10, "output_tokens": 5}}]


def _service(api: InMemoryPulls, **submitted: Any) -> PullRequests:
    async def task_events(task_id: str) -> list[dict]:
        return _events(task_id, **submitted)
    return PullRequests(ServiceStore("pull-requests"), host=HOST, api=api, task_events=task_events,
                        public_url="https://baton.example.com/")


def _completed(service: PullRequests, task: str, turn: int, seq: int) -> None:
    envelope = envelope_for(TaskCompleted(branch=f"baton/{task}", commit="c" * 40, turn=turn),
                            task_id=task, actor="service:task-runner")
    asyncio.run(service.on_task_completed(envelope, Tracking("pull-requests-TaskCompleted", seq)))


def test_a_completed_task_opens_one_pull_request_from_the_repos_default_branch_and_a_follow_up_updates_it():
    api = InMemoryPulls()
    service = _service(api, draft=True)
    _completed(service, "t1", 1, 1)
    _completed(service, "t1", 1, 2)  # The same turn again: decided already.
    _completed(service, "t1", 2, 3)
    pull = service.store.get_task_aggregate(PullRequest, "t1")
    assert len(api.pulls) == 1 and api.pulls[0]["base"] == "trunk" and api.pulls[0]["draft"] is True
    assert api.pulls[0]["title"] == "add a.txt" and "https://baton.example.com/tasks/t1" in api.pulls[0]["body"]
    assert "15 tokens" in api.pulls[0]["body"] and "wrote a.txt" in api.pulls[0]["body"]
    assert pull.seen_types == ["PullRequestOpened", "PullRequestUpdated"] and pull.number == 1


def test_a_step_that_died_after_github_opened_the_pull_request_finds_it_instead_of_opening_another():
    api = InMemoryPulls(lose_answer=True)
    service = _service(api)
    try:
        _completed(service, "t2", 1, 1)
    except RuntimeError:
        pass
    _completed(service, "t2", 1, 1)  # Handled again after the restart.
    assert len(api.pulls) == 1
    assert service.store.get_task_aggregate(PullRequest, "t2").number == 1


def test_a_refused_pull_request_is_recorded_with_githubs_reason_and_no_pr_means_none():
    service = _service(InMemoryPulls(refuse=GitHubError(403, "Resource not accessible by integration")))
    _completed(service, "t3", 1, 1)
    assert service.store.last_envelope(PullRequest, "t3").data["reason"] == (
        "GitHub API 403: Resource not accessible by integration")
    quiet = _service(InMemoryPulls(), pull_request=False)
    _completed(quiet, "t4", 1, 1)
    assert quiet.store.get_task_aggregate(PullRequest, "t4") is None


def test_the_token_is_for_its_own_host_and_scheme_only():
    settings = Settings(github_token="ghs_x", github_api_url="http://127.0.0.1:9/api/v3")
    assert token_credential(settings, "http://127.0.0.1:9/acme/w.git").username == "x-access-token"
    assert token_credential(settings, "https://127.0.0.1:9/acme/w.git") is None
    assert token_credential(settings, "http://other:9/acme/w.git") is None
    public = Settings(github_token="ghs_x")
    assert token_credential(public, "https://github.com/acme/w").host == "github.com"
    assert token_credential(Settings(), "https://github.com/acme/w") is None


def test_the_webhook_reads_feedback_on_baton_pull_requests_only_and_checks_the_signature():
    body = b'{"a": 1}'
    good = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert signature_valid("s3cret", body, good)
    assert not signature_valid("s3cret", body + b" ", good) and not signature_valid("s3cret", body, None)
    check = {"action": "completed", "check_run": {"name": "tests", "conclusion": "failure", "head_sha": "abc",
             "output": {"title": "2 failed"}, "pull_requests": [{"head": {"ref": "baton/t9"}}], "app": {"slug": "ci"}}}
    found = feedback_of("check_run", check)
    assert found.task_id == "t9" and found.actor == "github:ci" and "2 failed" in found.prompt
    assert feedback_of("check_run", {**check, "check_run": {**check["check_run"], "conclusion": "success"}}) is None
    other = {"action": "created", "comment": {"body": "x", "user": {"login": "o"}},
             "pull_request": {"head": {"ref": "feature"}}}
    assert feedback_of("pull_request_review_comment", other) is None
    assert feedback_of("issue_comment", {"action": "created", "comment": {"body": "fix", "user": {"login": "o"}}},
                       head_ref="baton/t7").task_id == "t7"
