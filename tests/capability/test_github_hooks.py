"""GitHub's other feedback comes back too: a failed check run on a Baton PR and a comment on the PR
(its branch asked of the API) become follow-ups; an unsigned delivery is refused; a successful
check is no feedback."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

import httpx
import pytest

from tests.capability.test_pull_requests import HOOK_SECRET, TOKEN, api, github, stack  # noqa: F401 - the same fake GitHub and stack
from tests.support.api import Api
from tests.support.fake_github import FakeGitHub
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_file
from tests.support.processes import BatonStack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability


def deliver(stack: BatonStack, event: str, payload: dict, *, signed: bool = True) -> httpx.Response:
    body = json.dumps(payload).encode()
    headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": secrets.token_hex(8), "Content-Type": "application/json"}
    if signed:
        headers["X-Hub-Signature-256"] = "sha256=" + hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return httpx.post(f"{stack.api}/api/hooks/github", content=body, headers=headers, timeout=10)


def pull_of(api: Api, task: str) -> dict:
    opened = wait_for(lambda: [e for e in api.events(task) if e["type"] == "PullRequestOpened"], timeout_s=60,
                      what="PullRequestOpened")
    return opened[0]["data"]


def test_a_failed_check_run_on_the_pull_request_becomes_the_agents_next_turn(stack: BatonStack, api: Api,
                                                                             github: FakeGitHub):
    task = api.submit(repo=github.repo_url("acme", "widgets"), agent="shell", prompt="echo 1 > one.txt")["task_id"]
    pull_of(api, task)
    run = {"name": "unit tests", "conclusion": "failure", "head_sha": "f" * 40, "app": {"slug": "github-actions"},
           "output": {"title": "1 test failed", "summary": "echo green > ci.txt"},
           "pull_requests": [{"number": 1, "head": {"ref": f"baton/{task}"}}]}
    green = deliver(stack, "check_run", {"action": "completed", "check_run": {**run, "conclusion": "success"},
                                         "repository": {"full_name": "acme/widgets"}})
    assert green.status_code == 202 and green.json()["state"].startswith("ignored"), green.text
    unsigned = deliver(stack, "check_run", {"action": "completed", "check_run": run}, signed=False)
    assert unsigned.status_code == 401, unsigned.text

    red = deliver(stack, "check_run", {"action": "completed", "check_run": run, "repository": {"full_name": "acme/widgets"}})
    assert red.status_code == 202 and red.json()["state"] == "follow-up recorded", red.text
    events = assert_flow_completes(api, task, timeout_s=90, turns=2)
    follow_up = [e for e in events if e["type"] == "FollowUpSubmitted"]
    assert len(follow_up) == 1 and follow_up[0]["actor"] == "github:github-actions"
    assert "`unit tests` failed" in follow_up[0]["data"]["prompt"]
    assert branch_file(github.root / "acme" / "widgets.git", f"baton/{task}", "ci.txt") == "green"


def test_a_comment_on_the_pull_request_is_traced_to_its_task_through_the_api(stack: BatonStack, api: Api,
                                                                            github: FakeGitHub):
    task = api.submit(repo=github.repo_url("acme", "widgets"), agent="shell", prompt="echo 2 > two.txt")["task_id"]
    pull = pull_of(api, task)
    comment = {"action": "created", "issue": {"number": pull["number"], "pull_request": {"url": "…"}},
               "comment": {"body": "echo thanks > thanks.txt", "user": {"login": "hubot"}},
               "repository": {"full_name": "acme/widgets"}}
    sent = deliver(stack, "issue_comment", comment)
    assert sent.status_code == 202 and sent.json() == {
        "delivery": sent.json()["delivery"], "task_id": task, "state": "follow-up recorded"}, sent.text
    # The gateway asked GitHub which branch the PR is from (an issue comment does not say).
    assert github.calls("GET", rf"/pulls/{pull['number']}$")
    assert_flow_completes(api, task, timeout_s=90, turns=2)
    assert branch_file(github.root / "acme" / "widgets.git", f"baton/{task}", "thanks.txt") == "thanks"
