"""Commit the workspace's work to the task's branch and push it to the origin.

This runs outside the agent's sandbox, so it never runs git on the workspace's `.git`: the agent
can write it, and a symlink planted there (a ref, a reflog, HEAD, the index…) would make the
vm_agent's git write wherever it points. Git runs on the vm_agent's own copy of the clone's git
dir instead (made by the provisioner before the agent could see the workspace, kept in the
vm_agent's state dir, which the sandbox hides), with the workspace as its work tree: git reads the
agent's files (it skips `.git` in a work tree and commits a symlink as a link, never following
it) and writes only to its own git dir. Every command runs with hooks, fsmonitor and reflogs off,
submodules not recursed into, and only the origin's transport allowed.
"""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.git_safety import credential_config, git_environment, hardened_config, redact
from services.runtime.repo_url import RepoCredential, RepoUrlError, scheme_of

# What the vm_agent's git never does, whatever a config or the work tree's attributes say.
_OWN_GIT_CONFIG = ("core.logAllRefUpdates=false", "submodule.recurse=false",
                   "push.recurseSubmodules=no", "diff.ignoreSubmodules=all", "core.untrackedCache=false")


class PushError(Exception):
    """The branch could not be committed or pushed; str() is git's own message."""


@dataclass(frozen=True)
class PushAccess:
    """What pushing a task's branch needs: the vm_agent's own copy of the clone's git dir, and
    the repo's credential (held in the vm_agent's memory only)."""

    git_dir: Path
    credential: RepoCredential | None = field(default=None, repr=False)


class Git:
    """A runner of git commands on the vm_agent's git dir with the workspace as work tree:
    hardened, the origin's transport the only one on, the credential by helper."""

    def __init__(self, workspace: Path, access: PushAccess, options: list[str]) -> None:
        self._access = access
        self._options = options
        self._env = {**git_environment(access.credential),
                     "GIT_DIR": str(access.git_dir), "GIT_WORK_TREE": str(workspace)}

    async def __call__(self, *args: str) -> str:
        code, stdout, stderr = await self._run(*args)
        if code != 0:
            command = next(arg for arg in args if not arg.startswith("-") and "=" not in arg)
            raise PushError(redact(f"git {command} failed: {stderr}", self._access.credential))
        return stdout

    async def succeeds(self, *args: str) -> bool:
        code, _, _ = await self._run(*args)
        return code == 0

    async def _run(self, *args: str) -> tuple[int, str, str]:
        # Run from inside its own git dir: nothing of the workspace is the current directory.
        process = await asyncio.create_subprocess_exec(
            "git", *self._options, *args, cwd=self._access.git_dir, env=self._env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
        assert process.returncode is not None
        return process.returncode, stdout.decode().strip(), stderr.decode(errors="replace").strip()


async def safe_git(workspace: Path, access: PushAccess) -> Git:
    """A Git for pushing `workspace`'s work; PushError if the vm_agent's git dir is missing."""
    if not (access.git_dir / "HEAD").is_file() or not (access.git_dir / "config").is_file():
        raise PushError(f"the clone's git dir ({access.git_dir}) is missing; cannot push safely")
    unconfigured = Git(workspace, access, hardened_config([]))
    origin = await unconfigured("config", "--get", "remote.origin.url")
    try:
        schemes = [scheme_of(origin)]
    except RepoUrlError as error:
        raise PushError(f"the origin's URL cannot be pushed to: {error}") from None
    own = [arg for option in _OWN_GIT_CONFIG for arg in ("-c", option)]
    return Git(workspace, access, [*hardened_config(schemes), *own, *credential_config(access.credential)])


async def put_head_on(git: Git, branch: str) -> None:
    """HEAD of the vm_agent's git dir on `refs/heads/<branch>`, which starts at the clone's commit
    (a later push of the same task builds on the last one). The work tree is not touched."""
    ref = f"refs/heads/{branch}"
    if not await git.succeeds("rev-parse", "--verify", "--quiet", ref) and await git.succeeds(
        "rev-parse", "--verify", "--quiet", "HEAD"
    ):
        await git("update-ref", ref, "HEAD")
    await git("symbolic-ref", "HEAD", ref)  # An empty origin: the branch's first commit is a root.


async def commit_and_push(workspace: Path, *, branch: str, message: str, access: PushAccess) -> str:
    """Commit everything in the work tree (even nothing, so the branch always exists) and push;
    returns the commit."""
    git = await safe_git(workspace, access)
    await put_head_on(git, branch)
    await git("add", "--all")
    await git("-c", "user.name=Baton", "-c", "user.email=baton@localhost",
              "commit", "--allow-empty", "--no-verify", "--quiet", "-m", message)
    commit = await git("rev-parse", "HEAD")
    await git("push", "--quiet", "--force", "--no-verify", "origin", f"HEAD:refs/heads/{branch}")
    return commit
