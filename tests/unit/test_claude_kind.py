"""The `claude` kind prepares Claude Code's private home and environment: asked permissions, offline."""

from __future__ import annotations

import json
from pathlib import Path

from vm_agent.backends import AGENT_KINDS

CLAUDE = AGENT_KINDS["claude"]


def _settings(home: Path) -> dict:
    return json.loads((home / ".claude" / "settings.json").read_text())


def test_claude_code_starts_in_the_mode_that_asks_baton_and_reaches_only_the_model(tmp_path: Path) -> None:
    env = CLAUDE.environment(tmp_path, {"HOME": "/agent-home", "ANTHROPIC_API_KEY": "sk-secret"})

    assert _settings(tmp_path) == {"permissions": {"defaultMode": "default"}}
    assert env == {
        "HOME": "/agent-home", "ANTHROPIC_API_KEY": "sk-secret", "IS_SANDBOX": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "CLAUDE_CODE_ENABLE_PROMPT_SUGGESTION": "false",
    }
    # The key stays in the environment, never in a file.
    assert "sk-secret" not in (tmp_path / ".claude" / "settings.json").read_text()


def test_what_claude_code_wrote_in_its_settings_is_kept_but_its_mode(tmp_path: Path) -> None:
    settings_file = tmp_path / ".claude" / "settings.json"
    settings_file.parent.mkdir()
    settings_file.write_text(json.dumps({"theme": "dark", "permissions": {"defaultMode": "auto", "allow": ["Read"]}}))

    CLAUDE.environment(tmp_path, {"ANTHROPIC_API_KEY": "k"})

    assert _settings(tmp_path) == {"theme": "dark", "permissions": {"defaultMode": "default", "allow": ["Read"]}}
