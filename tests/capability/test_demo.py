"""The README's first command: `.ci/bootstrap run` starts `baton up --demo`, which (with the NATS
it starts itself) prints the login URL and runs a demo task to a pushed branch."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.support.git_remote import branch_commit, branch_file
from tests.support.processes import BatonStack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability


def test_the_demo_prints_the_login_url_and_its_task_completes_on_a_pushed_branch(tmp_path: Path):
    stack = BatonStack(nats=None, data_dir=tmp_path / "baton", options=("--demo",)).start()
    try:
        said = wait_for(lambda: (lambda log: log if re.search(r"^(completed|failed|cancelled)\b", log, re.M)
                                 else None)(stack.log_path.read_text()), timeout_s=120, what="the demo task's end")
        [login] = re.findall(r"Open the web UI \(this URL logs you in\): (\S+)", said)
        assert login == f"{stack.api}/?token={stack.token}"
        ended = re.search(r"^completed: branch (\S+) at ([0-9a-f]{10})", said, re.M)
        assert ended, said
        branch, commit = ended.groups()
        origin = stack.data_dir / "demo" / "origin.git"
        assert branch_file(origin, branch, "hello.txt") == "Hello from Baton"
        assert (branch_commit(origin, branch) or "").startswith(commit)
        # The login URL is what a browser opens: it logs in and the demo task is on the board.
        with httpx.Client(timeout=10) as browser:
            assert browser.get(login).status_code == 303
            assert [t["state"] for t in browser.get(f"{stack.api}/api/tasks").json()["tasks"]] == ["completed"]
    finally:
        stack.stop()
