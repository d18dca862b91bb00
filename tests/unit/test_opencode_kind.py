"""The `opencode` kind prepares OpenCode's private home: its model, no snapshots, no npm install at
start, nothing secret in a file."""

from __future__ import annotations

import json
from pathlib import Path

from vm_agent.backends import AGENT_KINDS

OPENCODE = AGENT_KINDS["opencode"]
OFFLINE = {"OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1",
           "OPENCODE_DISABLE_LSP_DOWNLOAD": "1"}


def _config_dir(home: Path) -> Path:
    return home / ".config" / "opencode"


def test_the_model_goes_into_its_global_config_and_the_key_stays_in_the_environment(tmp_path: Path) -> None:
    env = OPENCODE.environment(tmp_path, {"HOME": "/agent-home", "ANTHROPIC_API_KEY": "k-secret",
                                          "OPENCODE_MODEL": "anthropic/claude-sonnet-4-5"})

    config = json.loads((_config_dir(tmp_path) / "opencode.json").read_text())
    assert config == {"model": "anthropic/claude-sonnet-4-5", "snapshot": False}
    assert env == {"HOME": "/agent-home", "ANTHROPIC_API_KEY": "k-secret",
                   "OPENCODE_MODEL": "anthropic/claude-sonnet-4-5", **OFFLINE}
    assert not any("k-secret" in path.read_text() for path in _config_dir(tmp_path).rglob("*") if path.is_file())


def test_its_plugin_package_counts_as_installed_so_it_never_runs_npm_at_start(tmp_path: Path) -> None:
    OPENCODE.environment(tmp_path, {"OPENAI_API_KEY": "k"})

    # OpenCode's check: node_modules exists, and every dependency package.json lists is in the lock.
    config_dir = _config_dir(tmp_path)
    assert (config_dir / "node_modules").is_dir()
    wanted = json.loads((config_dir / "package.json").read_text())["dependencies"]
    locked = json.loads((config_dir / "package-lock.json").read_text())["packages"][""]["dependencies"]
    assert set(wanted) == set(locked) == {"@opencode-ai/plugin"}
    # Without OPENCODE_MODEL the model is OpenCode's choice (or OPENCODE_CONFIG_CONTENT's).
    assert json.loads((config_dir / "opencode.json").read_text()) == {"snapshot": False}


def test_the_user_s_opencode_config_content_passes_through_untouched(tmp_path: Path) -> None:
    content = '{"provider": {"mine": {"options": {"apiKey": "{env:OPENAI_API_KEY}"}}}} // jsonc'

    env = OPENCODE.environment(tmp_path, {"OPENAI_API_KEY": "k", "OPENCODE_CONFIG_CONTENT": content})

    assert env["OPENCODE_CONFIG_CONTENT"] == content


def test_anthropic_base_url_means_what_it_means_to_claude_code(tmp_path: Path) -> None:
    def base_url(value: str) -> str:
        return OPENCODE.environment(tmp_path, {"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": value})[
            "ANTHROPIC_BASE_URL"]

    # Claude Code calls `<base>/v1/messages`; the AI SDK calls `<base>/messages`.
    assert base_url("http://127.0.0.1:8080") == "http://127.0.0.1:8080/v1"
    assert base_url("https://proxy.example/anthropic/") == "https://proxy.example/anthropic/v1"
    assert base_url("https://proxy.example/v1") == "https://proxy.example/v1"
