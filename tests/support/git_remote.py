"""Bare git repositories in temp dirs, used as the origin a task clones and pushes to."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path


def _git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def make_origin(root: Path, name: str = "origin.git") -> Path:
    """A bare repo whose `main` has one commit with a README."""
    origin = root / name
    _git("init", "--quiet", "--bare", "--initial-branch=main", str(origin))
    work = root / f"{name}-seed"
    _git("clone", "--quiet", str(origin), str(work))
    (work / "README.md").write_text("# test repo\n")
    _git("add", "README.md", cwd=work)
    _git("-c", "user.name=Test", "-c", "user.email=test@localhost", "commit", "-qm", "seed", cwd=work)
    _git("push", "--quiet", "origin", "HEAD:refs/heads/main", cwd=work)
    return origin


def push_file(origin: Path, branch: str, path: str, text: str) -> None:
    """Commit `path` with `text` on top of `branch` in the origin (as another person's push would)."""
    work = origin.parent / f"{origin.name}-push-{secrets.token_hex(4)}"
    _git("clone", "--quiet", "--branch", branch, str(origin), str(work))
    (work / path).write_text(text)
    _git("add", path, cwd=work)
    _git("-c", "user.name=Test", "-c", "user.email=test@localhost", "commit", "-qm", f"add {path}", cwd=work)
    _git("push", "--quiet", "origin", f"HEAD:refs/heads/{branch}", cwd=work)


def branch_file(origin: Path, branch: str, path: str) -> str | None:
    """The file's content on `branch` in the origin, or None if the branch or file is absent."""
    try:
        return _git("--git-dir", str(origin), "show", f"{branch}:{path}")
    except subprocess.CalledProcessError:
        return None


def branch_commit(origin: Path, branch: str) -> str | None:
    try:
        return _git("--git-dir", str(origin), "rev-parse", f"refs/heads/{branch}")
    except subprocess.CalledProcessError:
        return None
