"""A finished task opens one GitHub pull request (pushed with the token through git's credential
helper), a review comment on it comes back through the signed webhook as the agent's next turn,
which updates the same pull request; a refused PR is recorded with GitHub's reason; a
pull-requests service killed -9 at its step never opens two; the token is nowhere."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import signal
from pathlib import Path
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.capability.test_web_ui import browser, log_in, page  # noqa: F401 - the browser fixtures
from tests.support.api import Api
from tests.support.fake_github import FakeGitHub, fake_github
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_file, make_origin
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

TOKEN = f"ghs_{secrets.token_hex(16)}"
HOOK_SECRET = secrets.token_hex(16)


@pytest.fixture(scope="module")
def github(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGitHub]:
    root = tmp_path_factory.mktemp("github")
    (root / "acme").mkdir()
    make_origin(root / "acme", "widgets.git")
    with fake_github(root, token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, github: FakeGitHub) -> Iterator[BatonStack]:
    env = {"BATON_REPO_SCHEMES": "http,https,file", "BATON_GITHUB_TOKEN": TOKEN,
           "BATON_GITHUB_API_URL": github.api_url, "BATON_GITHUB_WEBHOOK_SECRET": HOOK_SECRET,
           "BATON_PUBLIC_URL": "https://baton.example.com", "BATON_LINGER_S": "60"}
    with running_stack(tmp_path_factory.mktemp("stack"), env=env) as running:
        yield running


@pytest.fixture(scope="module")
def api(stack: BatonStack) -> Api:
    return Api(stack.api, stack.token)


def pr_events(api: Api, task: str, kind: str) -> list[dict]:
    return [e for e in api.events(task) if e["type"] == kind]


def deliver(stack: BatonStack, event: str, payload: dict, *, delivery: str, secret: str = HOOK_SECRET) -> httpx.Response:
    """POST a webhook as GitHub does: the raw body signed, no API token."""
    body = json.dumps(payload).encode()
    signature = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return httpx.post(f"{stack.api}/api/hooks/github", content=body, timeout=10, headers={
        "X-GitHub-Event": event, "X-GitHub-Delivery": delivery, "X-Hub-Signature-256": signature,
        "Content-Type": "application/json"})


def review_comment(task: str, body: str, *, repo: str = "acme/widgets") -> dict:
    return {"action": "created", "comment": {"body": body, "path": "a.txt", "line": 1, "user": {"login": "octocat"}},
            "pull_request": {"number": 1, "head": {"ref": f"baton/{task}"}}, "repository": {"full_name": repo}}


def test_a_task_opens_one_pull_request_and_a_review_comment_becomes_its_next_turn(
        stack: BatonStack, api: Api, github: FakeGitHub):
    origin = github.root / "acme" / "widgets.git"
    task = api.submit(repo=github.repo_url("acme", "widgets"), agent="shell",
                      prompt="echo hello > a.txt\necho 'wrote a.txt for the widgets'")["task_id"]
    assert_flow_completes(api, task, timeout_s=90)
    opened = wait_for(lambda: pr_events(api, task, "PullRequestOpened"), timeout_s=30, what="PullRequestOpened")

    # Pushed over HTTP with the token as GitHub takes it (x-access-token basic auth).
    expected = "Basic " + base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    assert expected in github.git.authorizations and branch_file(origin, f"baton/{task}", "a.txt") == "hello"
    # Exactly one PR, head the task's branch, base the repo's default, written from the task.
    mine = [p for p in github.pulls if p["head"]["ref"] == f"baton/{task}"]
    assert len(mine) == 1 and mine[0]["base"]["ref"] == "main" and not mine[0]["draft"]
    assert mine[0]["title"] == "echo hello > a.txt"
    assert "> echo hello > a.txt" in mine[0]["body"] and "- `a.txt`" in mine[0]["body"]
    assert "wrote a.txt for the widgets" in mine[0]["body"]
    assert f"https://baton.example.com/tasks/{task}" in mine[0]["body"]
    assert opened[0]["data"] | {} == {"url": mine[0]["html_url"], "number": mine[0]["number"],
                                      "head": f"baton/{task}", "base": "main", "draft": False, "turn": 1}

    # A wrong signature is refused and records nothing.
    forged = deliver(stack, "pull_request_review_comment", review_comment(task, "echo evil > c.txt"),
                     delivery="d-forged", secret="not-the-secret")
    assert forged.status_code == 401, forged.text

    # The same branch name on another repo is not the task's.
    elsewhere = deliver(stack, "pull_request_review_comment", review_comment(task, "echo x", repo="evil/fork"),
                        delivery=f"d-{secrets.token_hex(4)}")
    assert elsewhere.status_code == 202 and elsewhere.json()["state"].startswith("ignored"), elsewhere.text

    # A signed review comment becomes the task's next turn, by the reviewer; redelivered, once.
    comment = review_comment(task, "echo fixed > b.txt")
    delivery = f"d-{secrets.token_hex(4)}"
    first = deliver(stack, "pull_request_review_comment", comment, delivery=delivery)
    again = deliver(stack, "pull_request_review_comment", comment, delivery=delivery)
    assert first.status_code == 202 and first.json()["state"] == "follow-up recorded", first.text
    assert again.status_code == 202 and again.json()["state"] == "already handled", again.text
    assert_flow_completes(api, task, timeout_s=90, turns=2)
    follow_ups = pr_events(api, task, "FollowUpSubmitted")
    assert len(follow_ups) == 1 and follow_ups[0]["actor"] == "github:octocat"
    assert "line 1" in follow_ups[0]["data"]["prompt"] and "echo fixed > b.txt" in follow_ups[0]["data"]["prompt"]
    assert branch_file(origin, f"baton/{task}", "b.txt") == "fixed"
    assert branch_file(origin, f"baton/{task}", "c.txt") is None

    # The same PR is updated for turn 2 (its description tells the follow-up); still one PR.
    updated = wait_for(lambda: pr_events(api, task, "PullRequestUpdated"), timeout_s=30, what="PullRequestUpdated")
    assert updated[0]["data"] == {"url": mine[0]["html_url"], "number": mine[0]["number"], "turn": 2}
    assert len([p for p in github.pulls if p["head"]["ref"] == f"baton/{task}"]) == 1
    assert "Follow-up (turn 2)" in mine[0]["body"] and "- `b.txt`" in mine[0]["body"]


def test_a_pull_request_github_refuses_is_recorded_with_its_reason_and_the_task_completes(
        api: Api, github: FakeGitHub):
    github.refuse_create = (422, "Validation Failed", [{"resource": "PullRequest", "code": "custom",
                                                        "message": "No commits between main and the branch"}])
    try:
        task = api.submit(repo=github.repo_url("acme", "widgets"), agent="shell", prompt="echo x > x.txt")["task_id"]
        assert_flow_completes(api, task, timeout_s=90)
        failed = wait_for(lambda: pr_events(api, task, "PullRequestFailed"), timeout_s=30, what="PullRequestFailed")
    finally:
        github.refuse_create = None
    assert failed[0]["data"]["reason"] == (
        "GitHub API 422: Validation Failed; No commits between main and the branch")
    assert api.task(task)["state"] == "completed"
    assert not pr_events(api, task, "PullRequestOpened")


def test_no_pr_opens_none_and_draft_opens_a_draft(api: Api, github: FakeGitHub):
    quiet = api.submit(repo=github.repo_url("acme", "widgets"), agent="shell", prompt="echo q > q.txt",
                       pull_request=False)["task_id"]
    assert_flow_completes(api, quiet, timeout_s=90)
    draft = api.submit(repo=github.repo_url("acme", "widgets"), agent="shell", prompt="echo d > d.txt",
                       draft=True)["task_id"]
    assert_flow_completes(api, draft, timeout_s=90)
    opened = wait_for(lambda: pr_events(api, draft, "PullRequestOpened"), timeout_s=30, what="the draft's PR")
    assert opened[0]["data"]["draft"] is True
    assert [p["draft"] for p in github.pulls if p["head"]["ref"] == f"baton/{draft}"] == [True]
    # TaskCompleted is handled in stream order: the later task's PR recorded, the task that asked
    # for none was decided before it: none.
    assert not [p for p in github.pulls if p["head"]["ref"] == f"baton/{quiet}"]
    assert not [e for e in api.events(quiet) if e["type"].startswith("PullRequest")]


def test_a_pull_requests_service_killed_at_its_step_never_opens_two(
        stack: BatonStack, api: Api, github: FakeGitHub):
    killed: list[int] = []

    def kill_the_service_before_it_records(pull: dict) -> None:
        # GitHub made the PR; the service dies before it hears so (between the call and the record).
        if not killed:
            killed.append(stack.service_pid("pull-requests"))
            os.kill(killed[0], signal.SIGKILL)

    github.on_created = kill_the_service_before_it_records
    try:
        task = api.submit(repo=github.repo_url("acme", "widgets"), agent="shell", prompt="echo k > k.txt")["task_id"]
        assert_flow_completes(api, task, timeout_s=90)
        opened = wait_for(lambda: pr_events(api, task, "PullRequestOpened"), timeout_s=60,
                          what="PullRequestOpened after the restart")
    finally:
        github.on_created = None
    assert killed and stack.service_pid("pull-requests") != killed[0]
    # The restarted service found the open PR for the branch instead of opening a second.
    assert len([p for p in github.pulls if p["head"]["ref"] == f"baton/{task}"]) == 1
    assert len(github.calls("POST", r"/pulls$")) >= 1 and len(opened) == 1


def test_the_github_token_is_in_no_event_log_store_or_audit_export(stack: BatonStack, api: Api, github: FakeGitHub):
    # An agent that prints its whole environment (and its vm_agent's) does not see the token.
    nosy = api.submit(repo=github.repo_url("acme", "widgets"), agent="shell",
                      prompt="env; cat /proc/$PPID/environ 2>/dev/null | tr '\\0' '\\n'; echo > n.txt")["task_id"]
    assert "PATH=" in json.dumps(assert_flow_completes(api, nosy, timeout_s=90)), "the agent printed its environment"
    wait_for(lambda: pr_events(api, nosy, "PullRequestOpened"), timeout_s=30, what="PullRequestOpened")
    # Nor does its vm_agent hold it (a vm_agent gets none of the install's secrets).
    vm_agent_environ = Path(f"/proc/{stack.vm_agent_pid(nosy)}/environ")
    if vm_agent_environ.exists():  # It may have left already (the workspace released).
        assert TOKEN.encode() not in vm_agent_environ.read_bytes()
    for path in stack.data_dir.rglob("*"):
        if path.is_file() and not path.name.endswith(".creds"):
            assert TOKEN.encode() not in path.read_bytes(), f"the token is in {path}"
    for task in api.http.get("/api/tasks").json()["tasks"]:
        assert TOKEN not in json.dumps(api.events(task["task_id"]))
    exported = api.http.get("/api/audit/export")
    assert exported.status_code == 200 and TOKEN not in exported.text


def test_the_task_page_links_the_pull_request_and_says_a_turn_came_from_github(
        stack: BatonStack, api: Api, github: FakeGitHub, page: Page):
    task = api.submit(repo=github.repo_url("acme", "widgets"), agent="shell", prompt="echo p > p.txt")["task_id"]
    opened = wait_for(lambda: pr_events(api, task, "PullRequestOpened"), timeout_s=90, what="PullRequestOpened")
    sent = deliver(stack, "pull_request_review_comment", review_comment(task, "echo q > q.txt"),
                   delivery=f"d-{secrets.token_hex(4)}")
    assert sent.status_code == 202, sent.text
    log_in(page, stack, f"/tasks/{task}")
    # The pull request is a link on the flow's timeline; the follow-up's turn names the reviewer.
    link = page.locator('#timeline [data-event="PullRequestOpened"] a.pr-link')
    expect(link).to_have_attribute("href", opened[0]["data"]["url"], timeout=30_000)
    expect(page.locator('#output .turn-prompt[data-turn="2"] .turn-label')).to_have_text(
        "Turn 2 · github:octocat:", timeout=90_000)
    expect(page.locator('#timeline [data-event="PullRequestUpdated"]')).to_be_visible(timeout=90_000)
