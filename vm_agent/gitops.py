"""Commit the workspace's changes to the task's branch and push it to the origin.

This runs outside the agent's sandbox, on a `.git` the agent could write: before any git
command, `reclaim_git_dir` puts back what the clone made, and every command runs with hooks
and fsmonitor off and only the origin's transport allowed.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.git_safety import credential_config, git_environment, hardened_config, redact
from services.runtime.repo_url import RepoCredential, RepoUrlError, scheme_of

Git = Callable[..., Awaitable[str]]

# Files in a git dir that make git read another config, object store or repository.
_PLANTABLE = ("commondir", "objects/info/alternates", "objects/info/http-alternates")


class PushError(Exception):
    """The branch could not be committed or pushed; str() is git's own message."""


@dataclass(frozen=True)
class PushAccess:
    """What pushing a task's branch needs: the clone's `.git/config` as saved by the provisioner,
    and the repo's credential (held in the vm_agent's memory only)."""

    saved_config: Path
    credential: RepoCredential | None = field(default=None, repr=False)


def reclaim_git_dir(workspace: Path, saved_config: Path) -> Path:
    """Undo what an agent may have planted in the workspace's git dir; the git dir.

    `.git` must still be a real directory; its config becomes the clone's again (no filter,
    fsmonitor, hooksPath, include, url rewrite or helper the agent added); files that send git
    to another object store or repository are removed. Hooks are off on every command anyway.
    """
    git_dir = workspace / ".git"
    if git_dir.is_symlink() or not git_dir.is_dir():
        raise PushError(f"{git_dir} is no longer the directory the clone made; not pushing from it")
    if not saved_config.is_file():
        raise PushError(f"the clone's git config ({saved_config}) is missing; cannot push safely")
    config = git_dir / "config"
    _remove(config)
    shutil.copyfile(saved_config, config)
    for planted in _PLANTABLE:
        _remove(git_dir / planted)
    return git_dir


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


async def _run_git(*args: str, env: dict[str, str], cwd: Path, credential: RepoCredential | None) -> str:
    process = await asyncio.create_subprocess_exec(
        "git", *args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        command = next(arg for arg in args if not arg.startswith("-") and "=" not in arg)
        message = f"git {command} failed: {stderr.decode(errors='replace').strip()}"
        raise PushError(redact(message, credential))
    return stdout.decode().strip()


async def safe_git(workspace: Path, access: PushAccess) -> Git:
    """A runner of git commands on the reclaimed workspace: its git dir and work tree given
    explicitly, hardened, the origin's transport the only one on, the credential by helper."""
    git_dir = reclaim_git_dir(workspace, access.saved_config)
    env = {**git_environment(access.credential), "GIT_DIR": str(git_dir), "GIT_WORK_TREE": str(workspace)}
    origin = await _run_git("config", "--file", str(access.saved_config), "--get", "remote.origin.url",
                            env=env, cwd=workspace, credential=None)
    try:
        schemes = [scheme_of(origin)]
    except RepoUrlError as error:
        raise PushError(f"the origin's URL cannot be pushed to: {error}") from None
    options = [*hardened_config(schemes), *credential_config(access.credential)]

    async def git(*args: str) -> str:
        return await _run_git(*options, *args, env=env, cwd=workspace, credential=access.credential)

    return git


async def commit_and_push(workspace: Path, *, branch: str, message: str, access: PushAccess) -> str:
    """Commit everything (even nothing, so the branch always exists) and push; returns the commit."""
    git = await safe_git(workspace, access)
    await git("checkout", "-B", branch)
    await git("add", "--all")
    await git("-c", "user.name=Baton", "-c", "user.email=baton@localhost",
              "commit", "--allow-empty", "--no-verify", "--quiet", "-m", message)
    commit = await git("rev-parse", "HEAD")
    await git("push", "--quiet", "--force", "--no-verify", "origin", f"HEAD:refs/heads/{branch}")
    return commit
