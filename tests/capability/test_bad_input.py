"""Bad input gets a clear error and loses nothing; a task that cannot run fails with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.api import Api
from tests.support.flow import assert_flow_completes

pytestmark = pytest.mark.capability


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"repo": "file:///tmp/x.git", "agent": "shell"}, "prompt"),
        ({"repo": "file:///tmp/x.git", "prompt": "", "agent": "shell"}, "prompt"),
        ({"repo": "file:///tmp/x.git", "prompt": "   ", "agent": "shell"}, "blank"),
        ({"prompt": "echo hi", "agent": "shell"}, "repo"),
        ({"repo": "--upload-pack=evil", "prompt": "echo hi"}, "must not start with '-'"),
        ({"repo": "file:///tmp/x.git", "prompt": "echo hi", "agent": "no-such-agent"}, "unknown agent"),
        ({"repo": "file:///tmp/x.git", "prompt": "echo hi", "surprise": 1}, "surprise"),
    ],
    ids=["missing-prompt", "empty-prompt", "blank-prompt", "missing-repo", "option-injection",
         "unknown-agent", "unknown-field"],
)
def test_bad_task_is_refused_with_a_message_and_health_stays_ok(api: Api, body: dict, message: str):
    before = len(api.http.get("/api/tasks").json()["tasks"])

    response = api.http.post("/api/tasks", json=body)

    assert response.status_code == 422
    assert message in response.text
    # Nothing was recorded, nothing crashed.
    assert len(api.http.get("/api/tasks").json()["tasks"]) == before
    assert api.http.get("/api/health").status_code == 200


def test_malformed_json_is_refused_with_a_message(api: Api):
    response = api.http.post(
        "/api/tasks", content=b'{"repo": "x", "prompt": ', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert "JSON" in response.text or "json" in response.text
    assert api.http.get("/api/health").status_code == 200


def test_unknown_task_is_a_404_with_a_message(api: Api):
    for path in ("/api/tasks/doesnotexist", "/api/tasks/doesnotexist/events"):
        response = api.http.get(path)
        assert response.status_code == 404
        assert "doesnotexist" in response.json()["detail"]


def test_a_repo_that_cannot_be_cloned_fails_the_task_with_git_s_reason(api: Api, tmp_path: Path):
    missing = (tmp_path / "nowhere.git").as_uri()
    task = api.submit(repo=missing, prompt="echo hi", agent="shell")

    events = api.wait_for_end(task["task_id"], timeout_s=60)

    failed = events[-1]
    assert failed["type"] == "TaskFailed"
    assert "git clone" in failed["data"]["reason"] and "nowhere.git" in failed["data"]["reason"]
    assert "WorkspaceFailed" in [e["type"] for e in events]
    board = api.wait_for_state(task["task_id"], "failed")
    assert board["reason"] == failed["data"]["reason"]
    assert api.http.get("/api/health").status_code == 200


def test_an_agent_script_that_fails_fails_the_task_with_its_exit_code(api: Api, origin: Path):
    task = api.submit(repo=origin.as_uri(), prompt="echo working\nexit 7", agent="shell")

    events = api.wait_for_end(task["task_id"], timeout_s=60)

    assert events[-1]["type"] == "TaskFailed"
    assert "exit code 7" in events[-1]["data"]["reason"]
    assert "BranchPushed" not in [e["type"] for e in events]


def test_a_known_base_branch_is_used_and_an_unknown_one_fails_clearly(api: Api, origin: Path):
    good = api.submit(repo=origin.as_uri(), prompt="git rev-parse --abbrev-ref HEAD", agent="shell",
                      base_branch="main")
    bad = api.submit(repo=origin.as_uri(), prompt="true", agent="shell", base_branch="no-such-branch")

    events = assert_flow_completes(api, good["task_id"], timeout_s=60)
    assert any(e["type"] == "AgentOutput" and e["data"]["text"].strip() == "main" for e in events)
    failed = api.wait_for_end(bad["task_id"], timeout_s=60)[-1]
    assert failed["type"] == "TaskFailed" and "no-such-branch" in failed["data"]["reason"]
