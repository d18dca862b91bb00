"""Operable like the services it runs beside: scraped by Prometheus, grepped as JSON, checked by `baton doctor`.

One stack for the module, started with BATON_LOG_FORMAT=json; one task through it, from a repo
whose URL carries a credential.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_http import GitHttpServer, git_http_server
from tests.support.git_remote import make_origin
from tests.support.processes import REPO_ROOT, BatonStack, running_stack

pytestmark = pytest.mark.capability
PASSWORD = f"PASS{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def json_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    with running_stack(tmp_path_factory.mktemp("operating"),
                       env={"BATON_LOG_FORMAT": "json", "BATON_REPO_SCHEMES": "https,ssh,file,http"}) as stack:
        yield stack


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("operating-git")
    make_origin(root)
    with git_http_server(root, username="alice", password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def completed_task(json_stack: BatonStack, git_server: GitHttpServer) -> dict:
    """One task run to its pushed branch, its repo URL carrying the password; its id."""
    api = Api(json_stack.api, json_stack.token)
    task = api.submit(repo=git_server.url("origin.git", userinfo=f"alice:{PASSWORD}"),
                      prompt='echo "operated" > hello.txt', agent="shell")
    assert_flow_completes(api, task["task_id"], timeout_s=90)
    return task


def scrape(stack: BatonStack) -> dict[tuple[str, tuple], float]:
    """/metrics, parsed by Prometheus's own parser: {(sample name, sorted labels): value}."""
    response = httpx.get(f"{stack.api}/metrics", headers=stack.auth, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_are_refused_without_the_token(json_stack: BatonStack):
    response = httpx.get(f"{json_stack.api}/metrics", timeout=10)
    assert response.status_code == 401
    assert "Authorization: Bearer" in response.json()["detail"]


def test_metrics_parse_and_move_after_a_completed_task(json_stack: BatonStack, git_server: GitHttpServer):
    before = scrape(json_stack)
    api = Api(json_stack.api, json_stack.token)
    task = api.submit(repo=git_server.url("origin.git", userinfo=f"alice:{PASSWORD}"),
                      prompt='echo "scraped" > hello.txt', agent="shell")
    assert_flow_completes(api, task["task_id"], timeout_s=90)
    api.wait_for_state(task["task_id"], "completed")
    after = scrape(json_stack)

    def moved(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    # The task board counts one more completed task.
    assert moved("baton_tasks", (("state", "completed"),)) == 1
    # Its prompt's delivery was timed, and each of its handoffs.
    assert moved("baton_task_prompt_delivery_seconds_count", (("agent", "shell"),)) == 1
    handoffs = {labels for name, labels in after if name == "baton_handoff_seconds_count"}
    assert sum(moved("baton_handoff_seconds_count", labels) for labels in handoffs) >= 3, handoffs
    assert moved("baton_events_total", (("type", "TaskCompleted"),)) == 1
    # What holds now is there too: consumers are caught up, nothing was dead-lettered.
    assert ("baton_consumer_lag_events", (("service", "projector"),)) in after
    assert after[("baton_dead_letters", ())] == 0
    assert ("baton_websocket_viewers", ()) in after
    # No task id is a label value.
    assert not any(task["task_id"] in str(labels) for _, labels in after)


def test_json_logs_parse_line_by_line_and_carry_the_task_id_and_never_the_credential(
        json_stack: BatonStack, completed_task: dict):
    logs = sorted((json_stack.data_dir / "logs").glob("*.log"))
    assert logs, list(json_stack.data_dir.rglob("*.log"))
    lines = [(path.name, line) for path in logs for line in path.read_text().splitlines() if line.strip()]
    records = [(name, json.loads(line)) for name, line in lines]  # every line is one JSON object
    assert all({"time", "level", "service", "message"} <= record.keys() for _, record in records)
    assert any(record.get("task_id") == completed_task["task_id"] for _, record in records)
    # The repo URL's password is in no log the stack wrote.
    for path in json_stack.data_dir.rglob("*.log"):
        assert PASSWORD not in path.read_text(errors="replace"), path


def test_doctor_names_a_missing_tool_and_exits_non_zero(tmp_path: Path):
    # A PATH with nats-server and node, but no git.
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("nats-server", "node"):
        if found := shutil.which(tool) or shutil.which(tool, path="/usr/sbin"):
            (tools / tool).symlink_to(found)
    done = subprocess.run([sys.executable, "-m", "services.cli.main", "doctor", "--data-dir", str(tmp_path / "baton")],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          env={**os.environ, "PATH": str(tools), "COLUMNS": "200"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "MISSING  git: not on PATH" in done.stdout
    assert "apt-get install git" in done.stdout
    assert "cannot run here until this is fixed: git" in done.stdout
    # Doctor only looks: it made no data dir.
    assert not (tmp_path / "baton").exists()
