"""The `gemini` kind prepares Gemini CLI's private home: its settings, its login, nothing secret."""

from __future__ import annotations

import json
from pathlib import Path

from vm_agent.backends import AGENT_KINDS

GEMINI = AGENT_KINDS["gemini"]


def _settings(home: Path) -> dict:
    return json.loads((home / ".gemini" / "settings.json").read_text())


def test_an_api_key_gets_the_api_key_login_and_no_telemetry_update_checks_or_ide(tmp_path: Path) -> None:
    env = GEMINI.environment(tmp_path, {"HOME": "/agent-home", "GEMINI_API_KEY": "k-secret"})

    settings = _settings(tmp_path)
    assert settings["security"]["auth"]["selectedType"] == "gemini-api-key"
    assert settings["privacy"]["usageStatisticsEnabled"] is False
    assert settings["telemetry"]["enabled"] is False
    assert settings["general"] == {"enableAutoUpdate": False, "enableAutoUpdateNotification": False}
    assert settings["ide"]["enabled"] is False
    # One process that stops when told; the key stays in the environment, never in a file.
    assert env == {"HOME": "/agent-home", "GEMINI_API_KEY": "k-secret", "GEMINI_CLI_NO_RELAUNCH": "true"}
    assert "k-secret" not in (tmp_path / ".gemini" / "settings.json").read_text()


def test_vertex_ai_credentials_get_the_vertex_login(tmp_path: Path) -> None:
    GEMINI.environment(tmp_path, {"GOOGLE_API_KEY": "k", "GOOGLE_GENAI_USE_VERTEXAI": "true"})

    assert _settings(tmp_path)["security"]["auth"]["selectedType"] == "vertex-ai"


def test_what_gemini_cli_wrote_in_its_settings_is_kept(tmp_path: Path) -> None:
    settings_file = tmp_path / ".gemini" / "settings.json"
    settings_file.parent.mkdir()
    settings_file.write_text(json.dumps({"ui": {"theme": "Dracula"}, "security": {"folderTrust": {"enabled": True}}}))

    GEMINI.environment(tmp_path, {"GEMINI_API_KEY": "k"})

    settings = _settings(tmp_path)
    assert settings["ui"] == {"theme": "Dracula"}
    assert settings["security"] == {"folderTrust": {"enabled": True}, "auth": {"selectedType": "gemini-api-key"}}


def test_a_broken_settings_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / ".gemini").mkdir()
    (tmp_path / ".gemini" / "settings.json").write_text("{not json")

    GEMINI.environment(tmp_path, {"GEMINI_API_KEY": "k"})

    assert _settings(tmp_path)["security"]["auth"]["selectedType"] == "gemini-api-key"
