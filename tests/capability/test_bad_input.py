"""Bad input gets a clear error and loses nothing; a task that cannot run fails with its reason."""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets

from events.envelope import new_task_id
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import make_origin
from tests.support.processes import BatonStack, NatsServer, free_port, running_stack
from tests.support.waiting import wait_for

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


@pytest.mark.parametrize(
    ("repo", "message"),
    [
        ("u:SEKRET@example.com:x.git", "scp form cannot carry a password"),
        ("ssh://-oProxyCommand=SEKRET@example.com/x.git", "user must not start with '-'"),
        ("ssh://%2DoProxyCommand=SEKRET@example.com/x.git", "user must not start with '-'"),
    ],
    ids=["scp-password", "ssh-option-as-user", "ssh-encoded-option-as-user"],
)
def test_an_ssh_repo_with_a_password_or_an_option_is_refused_without_repeating_it(
    api: Api, repo: str, message: str
):
    before = len(api.http.get("/api/tasks").json()["tasks"])

    response = api.http.post("/api/tasks", json={"repo": repo, "prompt": "echo hi", "agent": "shell"})

    assert response.status_code == 422 and message in response.text
    assert "SEKRET" not in response.text
    assert len(api.http.get("/api/tasks").json()["tasks"]) == before


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


# --- Limits and shapes (issue 11): nothing a client sends can jam or crash the gateway. ---

NOT_TASK_IDS = ["*", ">", "%3E", "%2A", "a.b", "ABCDEF0123456789"]


@pytest.mark.parametrize("route", ["/api/tasks/{}", "/api/tasks/{}/events", "/api/audit/tasks/{}/timeline"])
def test_a_task_id_that_is_not_one_is_a_404_saying_what_a_task_id_looks_like(api: Api, origin: Path, route: str):
    # A task exists, so a wildcard that reached NATS would find its events.
    api.submit(repo=origin.as_uri(), prompt="true", agent="shell")

    for not_an_id in NOT_TASK_IDS:
        response = api.http.get(route.format(not_an_id))

        assert response.status_code == 404, (not_an_id, response.text)
        assert "a task id is 16 lowercase hex digits" in response.json()["detail"]


def test_a_from_seq_past_any_stream_sequence_is_a_422_not_a_500(api: Api):
    task_id = new_task_id()
    for from_seq in (10**23, 2**64, 0, -1):
        response = api.http.get(f"/api/tasks/{task_id}/events", params={"from_seq": from_seq})

        assert response.status_code == 422, (from_seq, response.text)
        assert response.json()["detail"][0]["loc"] == ["query", "from_seq"]
    # An audit cursor is a stream sequence too.
    cursor = base64.urlsafe_b64encode(f"seq:{10**23}".encode()).decode()
    response = api.http.get("/api/audit/events", params={"cursor": cursor})
    assert response.status_code == 422 and "start without it" in response.json()["detail"]
    assert api.http.get("/api/health").status_code == 200


@pytest.mark.parametrize("path", [
    "/api/stream?from_seq=0",
    "/api/stream?from_seq=100000000000000000000000",
    "/api/stream?from_seq=abc",
    "/api/tasks/{task_id}/stream?from_seq=0",
    "/api/tasks/*/stream",
    "/api/tasks/%3E/stream",
], ids=["zero", "huge", "not-a-number", "task-zero", "task-star", "task-gt"])
def test_a_websocket_with_a_bad_from_seq_or_task_id_is_closed_with_1008_and_a_reason(api: Api, path: str):
    async def close_of(url: str) -> websockets.frames.Close:
        async with asyncio.timeout(10), api.stream(url) as socket:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await socket.recv()
            return closed.value.rcvd

    close = asyncio.run(close_of(path.format(task_id=new_task_id())))

    assert close.code == 1008
    assert ("from_seq" in close.reason) or ("16 lowercase hex digits" in close.reason), close.reason


def gateway_records(stack: BatonStack) -> int:
    """Events in the gateway's own store (what its relay will publish)."""
    with sqlite3.connect(f"file:{stack.data_dir / 'stores' / 'gateway.sqlite'}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM stored_events").fetchone()[0]


@pytest.mark.parametrize("field", ["prompt", "repo", "base_branch"])
def test_a_lone_surrogate_is_a_422_before_anything_is_recorded(stack: BatonStack, api: Api, field: str):
    body = {"repo": '"file:///tmp/x.git"', "prompt": '"echo hi"', "agent": '"shell"', "base_branch": '"main"'}
    body[field] = '"a\\ud800b"'  # In the JSON text: the six characters \ud800, half of a pair.
    raw = ("{" + ", ".join(f'"{k}": {v}' for k, v in body.items()) + "}").encode()
    tasks_before, records_before = len(api.http.get("/api/tasks").json()["tasks"]), gateway_records(stack)

    response = api.http.post("/api/tasks", content=raw, headers={"Content-Type": "application/json"})

    assert response.status_code == 422, response.text
    problem = response.json()["detail"][0]
    assert problem["loc"] == ["body", field] and "lone surrogate" in problem["msg"]
    # Nothing half-recorded: the gateway's store and the board are as they were.
    assert gateway_records(stack) == records_before
    assert len(api.http.get("/api/tasks").json()["tasks"]) == tasks_before


def test_a_task_too_big_for_the_bus_is_a_413_naming_the_limit_and_the_next_task_runs(
    stack: BatonStack, api: Api, origin: Path
):
    records_before = gateway_records(stack)

    # 200,000 control characters: 200 kB of prompt, 1.2 MB of JSON (each is \u0001).
    response = api.http.post("/api/tasks", json={"repo": origin.as_uri(), "prompt": "\x01" * 200_000})

    assert response.status_code == 413, response.text
    assert "max_payload" in response.json()["detail"] and "shorten the prompt" in response.json()["detail"]
    assert gateway_records(stack) == records_before
    # Intake is not jammed: the next task goes all the way.
    task = api.submit(repo=origin.as_uri(), prompt="echo after the big one", agent="shell")
    assert_flow_completes(api, task["task_id"], timeout_s=60)


def test_a_prompt_over_the_byte_limit_is_a_422_that_does_not_echo_it(api: Api):
    response = api.http.post("/api/tasks", json={"repo": "file:///tmp/x.git", "prompt": "é" * 150_000})

    assert response.status_code == 422
    assert "300,000 bytes in UTF-8; the limit is 262,144" in response.text
    assert len(response.content) < 2000


def test_a_body_bigger_than_any_task_is_refused_before_it_is_read(api: Api):
    before = len(api.http.get("/api/tasks").json()["tasks"])
    huge = b'{"repo": "file:///x", "prompt": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    declared = api.http.post("/api/tasks", content=huge, headers={"content-type": "application/json"})
    assert declared.status_code == 413 and "request body is over" in declared.json()["detail"]
    # Sent in chunks, without a length: counted as it arrives.
    chunked = api.http.post("/api/tasks", content=iter([huge[i:i + 65536] for i in range(0, len(huge), 65536)]),
                            headers={"content-type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    assert len(api.http.get("/api/tasks").json()["tasks"]) == before


def test_audit_verify_without_nats_says_where_it_looked_in_one_line_and_exits_2(stack: BatonStack):
    nowhere = f"nats://127.0.0.1:{free_port()}"
    env = {**os.environ, "BATON_DATA_DIR": str(stack.data_dir), "COLUMNS": "80"}

    for command in ("verify", "rebuild"):
        done = subprocess.run([sys.executable, "-m", "services.cli.main", "audit", command, "--nats-url", nowhere],
                              env=env, capture_output=True, text=True, timeout=60)

        output = (done.stdout + done.stderr).strip()
        assert done.returncode == 2, output
        assert len(output.splitlines()) == 1 and "Traceback" not in output, output
        assert nowhere in output and str(stack.data_dir) in output and "BATON_EVENTS" in output
        assert "--nats-url" in output and "--data-dir" in output


def test_audit_verify_on_a_nats_without_the_stream_says_so_in_one_line_and_exits_2(stack: BatonStack, tmp_path: Path):
    # A NATS that answers but holds no Baton stream (another install's, or a fresh one).
    empty = NatsServer(store_dir=tmp_path / "nats").start()
    try:
        env = {**os.environ, "BATON_DATA_DIR": str(stack.data_dir), "COLUMNS": "80"}
        for command in ("verify", "rebuild"):
            done = subprocess.run([sys.executable, "-m", "services.cli.main", "audit", command,
                                   "--nats-url", empty.url], env=env, capture_output=True, text=True, timeout=60)

            output = (done.stdout + done.stderr).strip()
            assert done.returncode == 2, output
            assert len(output.splitlines()) == 1 and "Traceback" not in output, output
            assert "NATS has no stream BATON_EVENTS" in output and empty.url in output, output
            assert "--nats-url" in output and "--data-dir" in output
    finally:
        empty.stop()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BatonStack, Api, Path]]:
    """A stack that serves 2 viewers at once and takes 2 tasks per client, then one per minute."""
    root = tmp_path_factory.mktemp("limited")
    env = {"BATON_MAX_VIEWERS": "2", "BATON_SUBMIT_BURST": "2", "BATON_SUBMIT_RATE_PER_S": "0.0167"}
    with running_stack(root, env=env) as stack:
        yield stack, Api(stack.api, stack.token), make_origin(root)


def test_one_viewer_past_the_cap_is_closed_with_1013_naming_the_cap(limited):
    _, api, _ = limited

    async def third_viewer_closes() -> websockets.frames.Close:
        async with api.stream("/api/stream") as first, api.stream("/api/stream") as second:
            await asyncio.gather(await first.ping(), await second.ping())  # Both are being served.
            async with asyncio.timeout(10), api.stream("/api/stream") as third:
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await third.recv()
                return closed.value.rcvd

    close = asyncio.run(third_viewer_closes())

    assert close.code == 1013 and "at most 2 live viewers" in close.reason and "BATON_MAX_VIEWERS" in close.reason

    # The slots came back when those viewers left: a new one is served (it answers a ping).
    async def served() -> bool:
        async with asyncio.timeout(5), api.stream("/api/stream") as socket:
            await (await socket.ping())
            return True

    assert wait_for(lambda: asyncio.run(served()), timeout_s=10, what="a viewer to be served again")


def test_a_client_past_its_submit_rate_gets_429_with_retry_after(limited):
    _, api, origin = limited
    body = {"repo": origin.as_uri(), "prompt": "true", "agent": "shell"}

    codes = [api.http.post("/api/tasks", json=body).status_code for _ in range(2)]
    refused = api.http.post("/api/tasks", json=body)

    assert codes == [201, 201]
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    assert "at most 2 at once" in refused.json()["detail"] and "BATON_SUBMIT_RATE_PER_S" in refused.json()["detail"]
