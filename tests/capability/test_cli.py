"""The `baton` CLI against a running stack: submit follows the flow live; tasks and events read it back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.git_remote import branch_file
from tests.support.processes import BatonStack, free_port

pytestmark = pytest.mark.capability


def baton(stack: BatonStack, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    # The CLI finds the API token where `baton up` wrote it: in the data dir.
    env = {**os.environ, "BATON_API": stack.api, "BATON_DATA_DIR": str(stack.data_dir), "COLUMNS": "200"}
    env.pop("BATON_API_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def test_baton_submit_follows_the_task_to_a_pushed_branch(stack: BatonStack, origin: Path):
    done = baton(stack, "submit", "--repo", origin.as_uri(), "--agent", "shell", "echo hello > hello.txt")

    assert done.returncode == 0, done.stdout + done.stderr
    for handoff in ("TaskSubmitted", "WorkspaceReady", "PromptDelivered", "BranchPushed", "TaskCompleted"):
        assert handoff in done.stdout
    task_id = done.stdout.split("task ", 1)[1].split()[0]
    assert branch_file(origin, f"baton/{task_id}", "hello.txt") == "hello"

    # The board and the history show the same task.
    assert task_id in baton(stack, "tasks").stdout
    history = baton(stack, "events", task_id, "--json").stdout.splitlines()
    assert '"type": "TaskCompleted"' in history[-1]


def test_baton_submit_exits_non_zero_when_the_task_fails(stack: BatonStack, origin: Path):
    done = baton(stack, "submit", "--repo", origin.as_uri(), "exit 3")

    assert done.returncode == 1
    assert "failed" in done.stdout and "exit code 3" in done.stdout


def test_baton_submit_reports_bad_input_without_a_traceback(stack: BatonStack):
    done = baton(stack, "submit", "--repo", "file:///x.git", "--agent", "nope", "echo hi")

    assert done.returncode == 2
    assert "unknown agent" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize("command", [["tasks"], ["submit", "--repo", "file:///x.git", "--no-follow", "hi"]])
def test_an_api_that_cannot_be_reached_is_named_in_one_line(command: list[str]) -> None:
    api = f"http://127.0.0.1:{free_port()}"  # Nothing listens there.
    done = subprocess.run([sys.executable, "-m", "services.cli.main", *command, "--api", api, "--token", "t"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    said = " ".join(done.stdout.split())
    assert said.startswith(f"error: cannot reach the Baton API at {api}") and "baton up" in said, said
    assert "Traceback" not in done.stderr
