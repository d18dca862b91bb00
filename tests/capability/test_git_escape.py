"""An agent cannot reach outside its sandbox through the git it shares with Baton.

The agent writes its workspace, `.git` included, while the vm_agent commits and pushes outside the
sandbox. A shell task plants symlinks in `.git` (its reflog, a ref directory, the reflog of the
task's branch) pointing outside, names a branch with a shell payload (which a reflog written to a
shell's rc file would run), and overwrites every object file of its clone of a repo given as a
plain local path. Nothing may appear outside, the origin must stay intact, and the task's branch
must still hold the agent's work.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_file
from tests.support.processes import BatonStack

pytestmark = pytest.mark.capability


def escaping_prompt(outside: Path) -> str:
    return (
        "git checkout -q -b 'x;touch${IFS}" + str(outside / "PWN") + ";#'\n"
        f"ln -sf {outside / 'PWNED_reflog'} .git/logs/HEAD\n"
        f"mkdir -p .git/logs/refs/heads && ln -s {outside / 'logdir'} .git/logs/refs/heads/baton\n"
        f"ln -s {outside / 'refdir'} .git/refs/heads/baton\n"
        "echo \"the agent's work\" > work.txt\n"
    )


# A clone with hardlinked objects would share them with the origin: the agent writes them all.
CORRUPTING_PROMPT = ('find .git/objects -type f | while read -r f; do chmod u+w "$f"; echo corrupted > "$f"; done\n'
                     "echo \"the agent's work\" > work.txt\n")


def entries(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def assert_work_pushed(origin: Path, task_id: str, events: list[dict]) -> None:
    """The task's branch holds the agent's work, on top of the origin's main."""
    branch = f"baton/{task_id}"
    assert next(e for e in events if e["type"] == "BranchPushed")["data"]["branch"] == branch
    assert branch_file(origin, branch, "work.txt") == "the agent's work"
    assert branch_file(origin, branch, "README.md") == "# test repo"


def test_symlinks_in_the_agent_s_git_dir_write_nothing_outside_and_the_work_is_pushed(
    api: Api, stack: BatonStack, origin: Path, tmp_path: Path
):
    outside = tmp_path / "outside"
    (outside / "logdir").mkdir(parents=True)
    (outside / "refdir").mkdir()

    task = api.submit(repo=origin.as_uri(), prompt=escaping_prompt(outside), agent="shell")
    events = assert_flow_completes(api, task["task_id"], timeout_s=90)

    # The agent did plant its links…
    git_dir = stack.data_dir / "workspaces" / task["task_id"] / ".git"
    assert (git_dir / "logs" / "HEAD").is_symlink() and (git_dir / "refs" / "heads" / "baton").is_symlink()
    # …yet nothing was written through them (no reflog, no ref, no payload run)…
    assert entries(outside) == ["logdir", "refdir"]
    # …and the work is pushed.
    assert_work_pushed(origin, task["task_id"], events)


def test_an_agent_cannot_write_the_objects_of_a_repo_given_as_a_local_path(
    api: Api, stack: BatonStack, origin: Path
):
    # A plain local path: the clone that git would make with hardlinks.
    task = api.submit(repo=str(origin), prompt=CORRUPTING_PROMPT, agent="shell")
    events = assert_flow_completes(api, task["task_id"], timeout_s=90)

    # The agent overwrote every object file of its clone…
    objects = stack.data_dir / "workspaces" / task["task_id"] / ".git" / "objects"
    assert {path.read_bytes() for path in objects.rglob("*") if path.is_file()} == {b"corrupted\n"}
    # …yet the origin's objects are intact (its own files, not the workspace's), and the work is pushed.
    fsck = subprocess.run(["git", "--git-dir", str(origin), "fsck", "--strict"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stderr
    assert branch_file(origin, "main", "README.md") == "# test repo"
    assert_work_pushed(origin, task["task_id"], events)
