"""Commit the workspace's changes to the task's branch and push it to the origin."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path


class PushError(Exception):
    """The branch could not be committed or pushed; str() is git's own message."""


async def _git(workspace: Path, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "git", *args,
        cwd=workspace,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise PushError(f"git {args[0]} failed: {stderr.decode(errors='replace').strip()}")
    return stdout.decode().strip()


async def commit_and_push(workspace: Path, *, branch: str, message: str) -> str:
    """Commit everything (even nothing, so the branch always exists) and push; returns the commit."""
    await _git(workspace, "checkout", "-B", branch)
    await _git(workspace, "add", "--all")
    await _git(
        workspace,
        "-c", "user.name=Baton", "-c", "user.email=baton@localhost",
        "commit", "--allow-empty", "--quiet", "-m", message,
    )
    commit = await _git(workspace, "rev-parse", "HEAD")
    await _git(workspace, "push", "--quiet", "--force", "origin", f"HEAD:refs/heads/{branch}")
    return commit
