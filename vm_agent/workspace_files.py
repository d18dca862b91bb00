"""The agent's ACP `fs/read_text_file` and `fs/write_text_file`, confined to its workspace.

The agent names files as it sees them: in the sandbox its workspace is `/workspace`
(`sandbox.WORKSPACE_VIEW`), unsandboxed it is the host path. Anything else is refused: a `..`
component, a path outside the workspace, or a symlink that resolves outside it. The check is made
on what was actually opened (`/proc/self/fd`), and a write goes through a pinned parent directory
with `O_NOFOLLOW`, so swapping a symlink in between cannot lead a read or write elsewhere.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MAX_READ_BYTES = 16 * 1024 * 1024
"""The biggest file the agent may read through the client (its own tools read anything)."""


class OutsideWorkspace(Exception):
    """The path names something outside the agent's workspace; str() says why."""


@dataclass(frozen=True)
class WorkspaceFiles:
    """The files of `host` (the workspace here), which the agent calls `view`."""

    host: Path
    view: Path

    def display_path(self, agent_path: str) -> str:
        """`agent_path` relative to the workspace when inside it (what a person wants to read)."""
        path = PurePosixPath(agent_path)
        for root in (PurePosixPath(self.view), PurePosixPath(self.host)):
            if path.is_absolute() and path.is_relative_to(root) and path != root:
                return str(path.relative_to(root))
        return agent_path

    def read_text(self, agent_path: str, *, line: int | None = None, limit: int | None = None) -> str:
        """The file's text (from 1-based `line`, at most `limit` lines); raises OutsideWorkspace,
        OSError (missing, too big…)."""
        target = self._host_path(agent_path).resolve()
        self._inside(target, agent_path)
        with self._opened(os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), agent_path) as fd:
            if os.fstat(fd).st_size > MAX_READ_BYTES:
                raise OSError(f"{agent_path} is bigger than {MAX_READ_BYTES} bytes")
            with os.fdopen(os.dup(fd), "rb") as file:
                text = file.read(MAX_READ_BYTES + 1).decode("utf-8", errors="replace")
        return _lines(text, line, limit)

    def write_text(self, agent_path: str, content: str) -> None:
        """Write `content` (UTF-8) to the file, making missing directories inside the workspace;
        raises OutsideWorkspace, OSError."""
        target = self._host_path(agent_path).resolve()
        self._inside(target, agent_path)  # Before making any directory.
        target.parent.mkdir(parents=True, exist_ok=True)
        parent = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        with self._opened(parent, agent_path) as dir_fd:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(target.name, flags, 0o644, dir_fd=dir_fd)
            with os.fdopen(fd, "wb") as file:
                file.write(content.encode("utf-8", errors="surrogatepass"))

    def _host_path(self, agent_path: str) -> Path:
        """Where `agent_path` is here, by name only (what it resolves to is checked on opening)."""
        path = PurePosixPath(agent_path)
        if ".." in path.parts:
            raise OutsideWorkspace(f"{agent_path!r} has a '..' component")
        if not path.is_absolute():
            return self.host / path
        for root in (PurePosixPath(self.view), PurePosixPath(self.host)):
            if path.is_relative_to(root):
                return self.host / path.relative_to(root)
        raise OutsideWorkspace(f"{agent_path!r} is outside the workspace {self.view}")

    @contextlib.contextmanager
    def _opened(self, fd: int, agent_path: str) -> Iterator[int]:
        """`fd`, once what it really is proves to be inside the workspace; closed after."""
        try:
            self._inside(Path(os.readlink(f"/proc/self/fd/{fd}")), agent_path)
            yield fd
        finally:
            os.close(fd)

    def _inside(self, real: Path, agent_path: str) -> None:
        root = self.host.resolve()
        if real != root and not real.is_relative_to(root):
            raise OutsideWorkspace(f"{agent_path!r} leads outside the workspace {self.view}")


def _lines(text: str, line: int | None, limit: int | None) -> str:
    """`text` from 1-based `line`, at most `limit` lines (ACP's read window)."""
    if line is None and limit is None:
        return text
    lines = text.splitlines(keepends=True)
    start = max((line or 1) - 1, 0)
    end = len(lines) if limit is None else start + limit
    return "".join(lines[start:end])
