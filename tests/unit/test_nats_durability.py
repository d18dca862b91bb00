"""Every nats-server configuration Baton writes makes JetStream fsync each message before its ack
(docs/durability.md): the one `baton up` runs and the one `baton nats-config` prints."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
from typer.testing import CliRunner

from services.cli.main import app
from services.cli.supervisor import Supervisor
from services.runtime.nats_auth import InstallAuth
from services.runtime.nats_server import nats_server_binary
from services.runtime.settings import Settings
from tests.support.processes import free_port
from tests.support.waiting import wait_for

SYNC_ALWAYS_LINE = 'sync_interval: "always"'


def jetstream_config_of_a_server_run_with(config: Path) -> dict:
    """What a real nats-server reports (/varz) about its JetStream after reading `config`."""
    monitor = free_port()
    server = subprocess.Popen([nats_server_binary(), "-c", str(config), "-a", "127.0.0.1", "-p", str(free_port()),
                               "-m", str(monitor)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        varz = wait_for(lambda: httpx.get(f"http://127.0.0.1:{monitor}/varz", timeout=1).json(),
                        timeout_s=20, what="nats-server's /varz")
        return varz["jetstream"]["config"]
    finally:
        server.terminate()
        server.wait(10)


def test_the_server_baton_configures_fsyncs_before_each_ack(tmp_path: Path):
    config = tmp_path / "server.conf"
    config.write_text(InstallAuth(tmp_path / "nats-auth").server_config(store_dir=tmp_path / "js"))
    assert SYNC_ALWAYS_LINE in config.read_text()
    jetstream = jetstream_config_of_a_server_run_with(config)
    assert jetstream["sync_always"] is True
    assert jetstream["store_dir"].startswith(str(tmp_path / "js"))


def test_the_nats_server_baton_up_starts_is_configured_to_fsync_before_each_ack(tmp_path: Path):
    supervisor = Supervisor(settings=Settings(data_dir=tmp_path / "baton"))
    supervisor._marks = {}  # What `start()` sets before it starts NATS.
    supervisor._start_nats()
    try:
        assert SYNC_ALWAYS_LINE in supervisor.settings.path("nats", "server.conf").read_text()
    finally:
        supervisor.nats.terminate()
        supervisor.nats.wait(10)


def test_baton_nats_config_fsyncs_before_each_ack_unless_told_an_interval(tmp_path: Path):
    runner = CliRunner()
    data_dir = str(tmp_path / "baton")
    done = runner.invoke(app, ["nats-config", "--data-dir", data_dir, "--store-dir", str(tmp_path / "js")])
    assert done.exit_code == 0, done.output
    assert SYNC_ALWAYS_LINE in done.output
    # An operator who takes nats-server's default (e.g. R3 across independent failure domains) says so.
    done = runner.invoke(app, ["nats-config", "--data-dir", data_dir, "--sync-interval", "2m"])
    assert done.exit_code == 0 and 'sync_interval: "2m"' in done.output, done.output
    done = runner.invoke(app, ["nats-config", "--data-dir", data_dir, "--sync-interval", "sometimes"])
    assert done.exit_code == 2 and "'always' or a duration" in done.output, done.output
