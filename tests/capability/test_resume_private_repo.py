"""A private repo's credential (given in the URL) is kept sealed while its task can take a follow-up:
a follow-up after the workspace was released clones it again; a task that fails drops it."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_http import git_http_server
from tests.support.git_remote import branch_file, make_origin
from tests.support.processes import running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability


def test_a_private_repo_task_takes_a_follow_up_after_release_and_a_failed_one_drops_its_credential(
        tmp_path: Path):
    password = f"PASS{secrets.token_hex(8)}"
    make_origin(tmp_path)
    with git_http_server(tmp_path, username="alice", password=password) as server, running_stack(
        tmp_path / "stack", env={"BATON_REPO_SCHEMES": "http,https,file", "BATON_LINGER_S": "2"},
    ) as stack:
        api = Api(stack.api, stack.token)
        repo = server.url("origin.git", userinfo=f"alice:{password}")
        sealed = stack.data_dir / "credentials"
        task = api.submit(repo=repo, prompt="echo one > a.txt", agent="shell")["task_id"]
        assert_flow_completes(api, task, timeout_s=90)
        wait_for(lambda: any(e["type"] == "WorkspaceReleased" for e in api.events(task)), timeout_s=30,
                 what="the workspace to be released after lingering")
        # Still sealed (never in the clear): the task can take a follow-up.
        assert (sealed / task).exists() and password.encode() not in (sealed / task).read_bytes()

        # The follow-up's workspace is cloned (and pushed) with the kept credential.
        sent = api.http.post(f"/api/tasks/{task}/messages", json={"prompt": "echo two > b.txt"})
        assert sent.status_code == 202, sent.text
        assert_flow_completes(api, task, timeout_s=90, turns=2)
        assert branch_file(tmp_path / "origin.git", f"baton/{task}", "b.txt") == "two"

        # A task that fails takes no follow-up: its credential is dropped.
        failing = api.submit(repo=repo, prompt="exit 3", agent="shell")["task_id"]
        assert api.wait_for_end(failing, timeout_s=90)[-1]["type"] == "TaskFailed"
        wait_for(lambda: not (sealed / failing).exists(), timeout_s=30, what="the failed task's credential to go")
        assert (sealed / task).exists()
