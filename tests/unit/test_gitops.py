"""The vm_agent pushes from a workspace the agent controlled: it never runs git on the workspace's
`.git`, so nothing the agent planted there runs or is followed, and the agent's work is pushed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from services.provisioner.local import LocalProvider
from services.runtime.git_safety import (
    credential_config, git_environment, hardened_config, save_clone_git_dir, vm_agent_git_dir,
)
from services.runtime.repo_url import RepoCredential
from services.runtime.settings import Settings
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
def cloned(tmp_path: Path) -> tuple[Path, Path, PushAccess]:
    """(origin, workspace, push access): a clone as the provisioner makes it, its git dir copied
    to the vm_agent's state dir."""
    origin = make_origin(tmp_path)
    workspace, state_dir = tmp_path / "workspace", tmp_path / "state"
    assert _git("clone", "--quiet", "--", str(origin), str(workspace), cwd=tmp_path).returncode == 0
    return origin, workspace, PushAccess(save_clone_git_dir(workspace, state_dir))


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
    origin, workspace, access = cloned
    marker, elsewhere = tmp_path / "ran.txt", tmp_path / "elsewhere"
    plant_everything(workspace, marker, elsewhere)
    # The plants are live: plain git in that workspace runs them.
    _git("add", "--all", cwd=workspace)
    assert marker.exists(), "the planted filter/fsmonitor/hooks should run under plain git"
    marker.unlink()
    _git("reset", "--quiet", cwd=workspace)
    marker.unlink(missing_ok=True)

    commit = await commit_and_push(workspace, branch="baton/t1", message="baton: t1", access=access)

    # Not one of them ran, and the branch is in the origin with the agent's work, unfiltered.
    assert not marker.exists()
    assert branch_commit(origin, "baton/t1") == commit
    assert branch_file(origin, "baton/t1", "work.txt") == "the agent's work"
    assert branch_file(origin, "baton/t1", ".gitattributes") == "* filter=evil"


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under `root`: a file's bytes, a directory or a link as such."""
    entries: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        entries[name] = (f"-> {os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir()
                         else path.read_bytes())
    return entries


def plant_symlinks(git_dir: Path, outside: Path) -> None:
    """Symlinks in the workspace's `.git` to files and directories outside it: where a git run
    on that `.git` would write its reflogs, refs, HEAD, packed refs, index and new objects."""
    (outside / "logdir").mkdir(parents=True)
    (outside / "refdir").mkdir()
    (git_dir / "logs").mkdir(exist_ok=True)
    (git_dir / "logs" / "HEAD").unlink(missing_ok=True)
    (git_dir / "logs" / "HEAD").symlink_to(outside / "PWNED_reflog")
    (git_dir / "logs" / "refs" / "heads").mkdir(parents=True, exist_ok=True)
    (git_dir / "logs" / "refs" / "heads" / "baton").symlink_to(outside / "logdir")
    (git_dir / "refs" / "heads" / "baton").symlink_to(outside / "refdir")
    for name in ("HEAD", "packed-refs", "index"):
        os.rename(git_dir / name, outside / name)
        (git_dir / name).symlink_to(outside / name)
    os.rename(git_dir / "objects", outside / "objects")
    (git_dir / "objects").symlink_to(outside / "objects")


async def test_symlinks_the_agent_planted_in_its_git_dir_are_never_followed(cloned, tmp_path: Path):
    origin, workspace, access = cloned
    outside = tmp_path / "outside"
    plant_symlinks(workspace / ".git", outside)
    (workspace / "work.txt").write_text("the agent's work\n")
    before = snapshot(outside)

    commit = await commit_and_push(workspace, branch="baton/t2", message="baton: t2", access=access)

    # Nothing was written outside: no reflog, no ref, no object, no index, HEAD unchanged…
    assert snapshot(outside) == before
    assert not (outside / "PWNED_reflog").exists()
    # …and the work is on the branch in the origin.
    assert branch_commit(origin, "baton/t2") == commit
    assert branch_file(origin, "baton/t2", "work.txt") == "the agent's work"
    tree = subprocess.run(["git", "--git-dir", str(origin), "ls-tree", "-r", "--name-only", "baton/t2"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert tree == ["README.md", "work.txt"]  # The workspace's `.git` is never part of the work.


async def test_a_symlink_in_the_work_tree_is_pushed_as_a_link_never_followed(cloned):
    origin, workspace, access = cloned
    (workspace / "passwd").symlink_to("/etc/passwd")

    await commit_and_push(workspace, branch="baton/t3", message="m", access=access)

    entry = subprocess.run(["git", "--git-dir", str(origin), "ls-tree", "baton/t3", "passwd"],
                           capture_output=True, text=True, check=True).stdout
    assert entry.startswith("120000 blob ")
    assert branch_file(origin, "baton/t3", "passwd") == "/etc/passwd"


async def test_the_agent_s_own_git_dir_is_left_to_it_and_not_needed(cloned, tmp_path: Path):
    origin, workspace, access = cloned
    (workspace / "work.txt").write_text("committed by the agent\n")
    assert _git("add", "work.txt", cwd=workspace).returncode == 0
    assert _git("-c", "user.name=A", "-c", "user.email=a@b", "commit", "-qm", "mine", cwd=workspace).returncode == 0
    agent_head = _git("rev-parse", "HEAD", cwd=workspace).stdout.strip()

    await commit_and_push(workspace, branch="baton/t4", message="m", access=access)

    # The agent's repository is as it left it, and still works for it.
    assert _git("rev-parse", "HEAD", cwd=workspace).stdout.strip() == agent_head
    assert _git("status", "--short", cwd=workspace).returncode == 0
    # Even with its `.git` gone (or replaced by a link), the work tree is what is pushed.
    os.rename(workspace / ".git", tmp_path / "moved-git")
    (workspace / ".git").symlink_to(tmp_path / "moved-git")
    (workspace / "more.txt").write_text("more\n")
    await commit_and_push(workspace, branch="baton/t4", message="m2", access=access)
    assert branch_file(origin, "baton/t4", "work.txt") == "committed by the agent"
    assert branch_file(origin, "baton/t4", "more.txt") == "more"
    # The second push built on the first.
    parents = subprocess.run(["git", "--git-dir", str(origin), "log", "--format=%s", "baton/t4"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert parents == ["m2", "m", "seed"]


async def test_a_push_without_the_vm_agent_s_git_dir_is_refused(cloned, tmp_path: Path):
    _, workspace, _ = cloned
    with pytest.raises(PushError, match="missing; cannot push safely"):
        await commit_and_push(workspace, branch="baton/t5", message="m",
                              access=PushAccess(vm_agent_git_dir(tmp_path / "nowhere")))


async def test_a_local_repo_is_cloned_without_hardlinks_and_its_git_dir_copied(tmp_path: Path):
    origin = make_origin(tmp_path)
    provider = LocalProvider(Settings(data_dir=tmp_path / "data", secret="s"))

    workspace = await provider.clone("0123456789abcdef", str(origin), None)

    objects = [path for path in (workspace / ".git" / "objects").rglob("*") if path.is_file()]
    assert objects and all(path.stat().st_nlink == 1 for path in objects)
    copy = vm_agent_git_dir(provider.vm_agent_dir("0123456789abcdef"))
    copied = [path for path in (copy / "objects").rglob("*") if path.is_file()]
    assert len(copied) == len(objects) and all(path.stat().st_nlink == 1 for path in copied)
    assert not any(path.is_symlink() for path in copy.rglob("*"))


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
