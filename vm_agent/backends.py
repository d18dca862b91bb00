"""The coding agents a vm_agent can start, each spoken to over ACP."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Backend:
    name: str
    title: str
    command: tuple[str, ...]

    def available(self) -> bool:
        return shutil.which(self.command[0]) is not None


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("shell", "Shell (runs the prompt as a bash script)",
                (sys.executable, "-m", "vm_agent.agents.shell")),
        Backend("claude", "Claude Code (claude-code-acp)", ("claude-code-acp",)),
        Backend("gemini", "Gemini CLI (gemini --experimental-acp)", ("gemini", "--experimental-acp")),
    )
}


def available_backends() -> dict[str, Backend]:
    return {name: backend for name, backend in BACKENDS.items() if backend.available()}
