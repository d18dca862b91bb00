"""A credential in a repo URL is used (clone and push, through a git credential helper) and
never recorded; bad repo URLs are refused with a message and leave nothing behind."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_http import git_http_server
from tests.support.git_remote import branch_commit, branch_file, make_origin
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability


@pytest.fixture(scope="module")
def stack_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repo-credentials")


@pytest.fixture(scope="module")
def stack(stack_root: Path) -> Iterator[BatonStack]:
    """A stack (its data dir and NATS store under `stack_root`) that also allows plain http, so
    a test can serve a repo over real HTTP without a certificate."""
    with running_stack(stack_root, env={"BATON_REPO_SCHEMES": "http,https,file"}) as running:
        yield running


@pytest.fixture(scope="module")
def api(stack: BatonStack) -> Api:
    return Api(stack.api, stack.token)


def files_containing(root: Path, secret: bytes) -> list[str]:
    """Every file under `root` (stores, WAL files, logs, the NATS store…) whose bytes hold `secret`."""
    return [str(path) for path in root.rglob("*")
            if path.is_file() and not path.is_symlink() and secret in path.read_bytes()]


def assert_recorded_nowhere(api: Api, stack_root: Path, task_id: str, secret: str) -> None:
    # The board and the audit log have taken in the task's last event…
    wait_for(lambda: api.task(task_id)["state"] in ("completed", "failed"), timeout_s=30,
             what="the board to show the task ended")
    export = wait_for(lambda: (text := api.http.get("/api/audit/export", params={"task_id": task_id}).text)
                      and ('"TaskCompleted"' in text or '"TaskFailed"' in text) and text,
                      timeout_s=30, what="the audit log to have the task's end")
    # …and the secret is in no answer of the API and no file under the stack's dirs.
    answers = {
        "events": api.http.get(f"/api/tasks/{task_id}/events").text,
        "task": api.http.get(f"/api/tasks/{task_id}").text,
        "board": api.http.get("/api/tasks").text,
        "audit export": export,
    }
    assert [name for name, text in answers.items() if secret in text] == []
    assert files_containing(stack_root, secret.encode()) == []


def test_a_credential_in_the_repo_url_is_recorded_nowhere_when_the_clone_fails(api: Api, stack_root: Path):
    # Port 9 (discard) refuses the connection: the clone fails.
    task = api.submit(repo="https://u:SEKRET@127.0.0.1:9/x.git", prompt="echo hi", agent="shell")
    assert task["repo"] == "https://127.0.0.1:9/x.git"

    failed = api.wait_for_end(task["task_id"], timeout_s=60)[-1]

    assert failed["type"] == "TaskFailed"
    assert "git clone https://127.0.0.1:9/x.git failed" in failed["data"]["reason"]
    assert_recorded_nowhere(api, stack_root, task["task_id"], "SEKRET")
    # The search does see what was recorded: the URL without the credential, in the stores and the stream.
    recorded = files_containing(stack_root, b"https://127.0.0.1:9/x.git")
    assert any("/nats/" in path for path in recorded) and any("/stores/" in path for path in recorded)


def test_a_task_clones_and_pushes_with_the_credential_of_its_repo_url(
    api: Api, stack_root: Path, tmp_path: Path
):
    password, nonce = f"PASS{secrets.token_hex(8)}", secrets.token_hex(8)
    origin = make_origin(tmp_path)
    with git_http_server(tmp_path, username="alice", password=password) as server:
        # The server refuses anyone without the credential: the clone and the push both need it.
        task = api.submit(repo=server.url("origin.git", userinfo=f"alice:{password}"),
                          prompt=f'echo "{nonce}" > hello.txt', agent="shell")
        assert task["repo"] == server.url("origin.git")

        events = assert_flow_completes(api, task["task_id"], timeout_s=90)

        assert any(server.accepts(header) for header in server.authorizations)
    branch = f"baton/{task['task_id']}"
    pushed = next(e for e in events if e["type"] == "BranchPushed")["data"]
    assert branch_commit(origin, branch) == pushed["commit"]
    assert branch_file(origin, branch, "hello.txt") == nonce
    assert_recorded_nowhere(api, stack_root, task["task_id"], password)


@pytest.mark.parametrize(
    ("repo", "message"),
    [
        (" --upload-pack=touch /tmp/pwned", "must not start with '-'"),
        ("ext::sh -c touch% /tmp/pwned", "remote helper"),
        ("file:///tmp/x\u0000.git", "control characters"),
        ("ftp://u:SEKRET@example.com/x.git", "BATON_REPO_SCHEMES"),
        ("gopher://example.com/x.git", "'gopher' is not allowed"),
        ("https://example.com/x.git?access_token=SEKRET", "must not have a query (?…) or fragment (#…)"),
        ("https://example.com/x.git#SEKRET", "must not have a query (?…) or fragment (#…)"),
        ("https://-oProxyCommand=SEKRET@example.com/x.git", "user must not start with '-'"),
    ],
    ids=["leading-space-upload-pack", "ext-transport", "nul", "unknown-scheme-with-credential",
         "unknown-scheme", "token-in-query", "token-in-fragment", "option-as-user"],
)
def test_a_bad_repo_url_is_refused_with_a_message_and_nothing_is_recorded(
    api: Api, stack_root: Path, repo: str, message: str
):
    before = api.http.get("/api/tasks").json()["tasks"]
    # A private-repo task of this stack keeps its sealed credential while it can take a follow-up.
    sealed_before = set((stack_root / "baton").glob("credentials/*"))

    response = api.http.post("/api/tasks", json={"repo": repo, "prompt": "echo hi", "agent": "shell"})

    assert response.status_code == 422, response.text
    assert message in response.text
    assert "SEKRET" not in response.text
    assert api.http.get("/api/tasks").json()["tasks"] == before
    assert set((stack_root / "baton").glob("credentials/*")) == sealed_before
