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
    env: tuple[str, ...] = ()
    """The environment variables this agent needs (its API key…): the only ones, besides a small
    allowlist (`vm_agent/sandbox.py`), that it gets from the vm_agent's environment."""

    def available(self) -> bool:
        return shutil.which(self.command[0]) is not None


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("shell", "Shell (runs the prompt as a bash script)",
                (sys.executable, "-m", "vm_agent.agents.shell")),
        Backend("claude", "Claude Code (claude-code-acp)", ("claude-code-acp",),
                env=("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "ANTHROPIC_MODEL",
                     "CLAUDE_CODE_OAUTH_TOKEN", "CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX")),
        Backend("gemini", "Gemini CLI (gemini --experimental-acp)", ("gemini", "--experimental-acp"),
                env=("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION",
                     "GOOGLE_GENAI_USE_VERTEXAI")),
    )
}


def available_backends() -> dict[str, Backend]:
    return {name: backend for name, backend in BACKENDS.items() if backend.available()}
