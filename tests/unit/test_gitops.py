"""The vm_agent pushes from a workspace the agent controlled: nothing the agent planted in it runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from services.runtime.git_safety import (
    credential_config, git_environment, hardened_config, save_clone_config,
)
from services.runtime.repo_url import RepoCredential
from tests.support.git_remote import branch_commit, branch_file, make_origin
from vm_agent.gitops import PushAccess, PushError, commit_and_push


def _git(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "GIT_TERMINAL_PROMPT": "0"})


def _script(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho ran >> {marker}\ncat\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def cloned(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(origin, workspace, state dir): a clone as the provisioner makes it, its config saved."""
    origin = make_origin(tmp_path)
    workspace, state_dir = tmp_path / "workspace", tmp_path / "state"
    assert _git("clone", "--quiet", "--", str(origin), str(workspace), cwd=tmp_path).returncode == 0
    save_clone_config(workspace, state_dir)
    return origin, workspace, state_dir


def plant_everything(workspace: Path, marker: Path, elsewhere: Path) -> None:
    """What a hostile agent could leave: hooks, a hooksPath, a clean filter, an fsmonitor, an
    include, an alternate object store."""
    git_dir = workspace / ".git"
    for hook in ("pre-commit", "commit-msg", "post-checkout", "post-commit", "pre-push",
                 "reference-transaction", "pre-auto-gc"):
        _script(git_dir / "hooks" / hook, marker)
        _script(elsewhere / "hooks" / hook, marker)
    filter_script = _script(elsewhere / "clean.sh", marker)
    fsmonitor = _script(elsewhere / "fsmonitor.sh", marker)
    (elsewhere / "included").write_text(f"[core]\n\tfsmonitor = {fsmonitor}\n")
    with (git_dir / "config").open("a") as config:
        config.write(f'[core]\n\thooksPath = {elsewhere / "hooks"}\n\tfsmonitor = {fsmonitor}\n'
                     f'[filter "evil"]\n\tclean = {filter_script}\n\tsmudge = {filter_script}\n'
                     f'[include]\n\tpath = {elsewhere / "included"}\n')
    (workspace / ".gitattributes").write_text("* filter=evil\n")
    (git_dir / "objects" / "info" / "alternates").write_text(f"{elsewhere}/objects\n")
    (workspace / "work.txt").write_text("the agent's work\n")


async def test_nothing_the_agent_planted_runs_when_the_branch_is_pushed(cloned, tmp_path: Path):
    origin, workspace, state_dir = cloned
    marker, elsewhere = tmp_path / "ran.txt", tmp_path / "elsewhere"
    plant_everything(workspace, marker, elsewhere)
    # The plants are live: plain git in that workspace runs them.
    _git("add", "--all", cwd=workspace)
    assert marker.exists(), "the planted filter/fsmonitor/hooks should run under plain git"
    marker.unlink()
    _git("reset", "--quiet", cwd=workspace)
    marker.unlink(missing_ok=True)

    commit = await commit_and_push(workspace, branch="baton/t1", message="baton: t1",
                                   access=PushAccess(state_dir / "clone-git-config"))

    # Not one of them ran, and the branch is in the origin with the agent's work, unfiltered.
    assert not marker.exists()
    assert branch_commit(origin, "baton/t1") == commit
    assert branch_file(origin, "baton/t1", "work.txt") == "the agent's work"
    config = (workspace / ".git" / "config").read_text()
    assert "evil" not in config and "fsmonitor" not in config and "hooksPath" not in config
    assert not (workspace / ".git" / "objects" / "info" / "alternates").exists()


async def test_a_git_dir_the_agent_replaced_is_not_pushed_from(cloned, tmp_path: Path):
    _, workspace, state_dir = cloned
    os.rename(workspace / ".git", tmp_path / "moved-git")
    (workspace / ".git").symlink_to(tmp_path / "moved-git")

    with pytest.raises(PushError, match="no longer the directory the clone made"):
        await commit_and_push(workspace, branch="baton/t2", message="m",
                              access=PushAccess(state_dir / "clone-git-config"))


async def test_a_push_without_the_saved_clone_config_is_refused(cloned, tmp_path: Path):
    _, workspace, _ = cloned
    with pytest.raises(PushError, match="missing; cannot push safely"):
        await commit_and_push(workspace, branch="baton/t3", message="m",
                              access=PushAccess(tmp_path / "nowhere" / "clone-git-config"))


def test_the_credential_helper_answers_only_for_the_credential_s_host(tmp_path: Path):
    credential = RepoCredential(host="example.test:8443", username="alice", password="SEKRET")
    base = [*hardened_config(["https"]), *credential_config(credential), "credential", "fill"]

    def fill(host: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *base], input=f"protocol=https\nhost={host}\n\n", text=True,
                              capture_output=True, cwd=tmp_path, env=git_environment(credential))

    assert "username=alice\npassword=SEKRET" in fill("example.test:8443").stdout
    # Another host (a redirect, say) gets nothing, and git does not prompt.
    other = fill("elsewhere.test")
    assert "SEKRET" not in other.stdout + other.stderr and other.returncode != 0
    # The secret is in the git process's environment only, never its arguments.
    assert not any("SEKRET" in arg for arg in base)


def test_hardened_git_refuses_the_ext_transport_even_if_a_url_got_that_far(tmp_path: Path):
    marker = tmp_path / "pwned"
    done = subprocess.run(
        ["git", *hardened_config(["https", "ssh", "file"]), "clone", "--",
         f"ext::sh -c touch% {marker}", str(tmp_path / "clone")],
        capture_output=True, text=True, env=git_environment(None), cwd=tmp_path,
    )
    assert done.returncode != 0 and "transport 'ext' not allowed" in done.stderr
    assert not marker.exists()
