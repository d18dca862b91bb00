"""A task on `hetzner` runs end to end as a user runs one: `baton up` with the Hetzner provider
configured against the fake API, whose servers boot by running their user_data in a network
namespace of their own. The VM's vm_agent (installed by cloud-init from the control plane) calls
home over the bus with its scoped credential, clones the repo from a git origin it reaches over the
network, runs the agent and pushes; the server is deleted afterwards with its cost on the record.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.api import Api
from tests.support.fake_hetzner import FakeHetzner, NetnsBooter, netns_available
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_file, make_origin
from tests.support.processes import BatonStack, NatsServer, free_port, nats_server_binary
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

TOKEN = "hc-task-test-token-" + "5" * 24
CALL_HOME_TIMEOUT_S = 240


class BridgedNats(NatsServer):
    """The stack's NATS on every interface: the services reach it on 127.0.0.1, the VMs on the
    bridge (it trusts only the install's credentials, as `baton up`'s own does)."""

    def start(self) -> BridgedNats:
        config = self.store_dir.parent / f"{self.store_dir.name}.conf"
        self.store_dir.parent.mkdir(parents=True, exist_ok=True)
        from services.runtime.nats_auth import InstallAuth  # (as NatsServer configures a trusting one)

        config.write_text(InstallAuth(self.trusting / "nats-auth").server_config(store_dir=self.store_dir))
        self.process = subprocess.Popen([nats_server_binary(), "-c", str(config), "-a", "0.0.0.0", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _connects("127.0.0.1", self.port), timeout_s=20, what=f"nats-server on port {self.port}")
        return self


def _connects(host: str, port: int) -> bool:
    import socket

    try:
        socket.create_connection((host, port), 0.5).close()
    except OSError:
        return False
    return True


@dataclass
class Cloud:
    fake: FakeHetzner
    vms: NetnsBooter
    stack: BatonStack
    origin: Path
    repo_url: str

    @property
    def api(self) -> Api:
        return Api(self.stack.api, self.stack.token)


def git_daemon(root: Path, host: str) -> tuple[subprocess.Popen, str]:
    """The origin served over the network (git://, pushes allowed): the VM cannot see this disk."""
    port = free_port()
    daemon = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", "--enable=receive-pack",
                               f"--base-path={root}", f"--listen={host}", f"--port={port}", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _connects(host, port), timeout_s=20, what="git daemon")
    return daemon, f"git://{host}:{port}"


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    if problem := netns_available():
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("hetzner-task")
    with FakeHetzner(token=TOKEN) as fake, NetnsBooter(root / "vms", image_python=Path(sys.executable)) as vms:
        fake.state.boot, fake.state.halt = vms.boot, vms.halt
        origin = make_origin(root / "git")
        daemon, git_base = git_daemon(root / "git", vms.host_address)
        nats = BridgedNats(store_dir=root / "nats", trusting=root / "baton").start()
        port = free_port()
        env = {
            "BATON_HCLOUD_TOKEN": TOKEN, "BATON_HCLOUD_ENDPOINT": fake.endpoint, "BATON_HCLOUD_LOCATIONS": "fsn1",
            "BATON_VM_NATS_URL": f"nats://{vms.host_address}:{nats.port}",
            "BATON_VM_GATEWAY_URL": f"http://{vms.host_address}:{port}",
            "BATON_HOST": "0.0.0.0", "BATON_ALLOWED_HOSTS": vms.host_address,
            "BATON_REPO_SCHEMES": "git,file", "BATON_VM_CALL_HOME_TIMEOUT_S": str(CALL_HOME_TIMEOUT_S),
            "BATON_HCLOUD_REAP_EVERY_S": "5",
        }
        stack = BatonStack(nats=nats, data_dir=root / "baton", extra_env=env, port=port)
        try:
            stack.start()
            yield Cloud(fake, vms, stack, origin, f"{git_base}/origin.git")
        finally:
            stack.stop()
            nats.stop()
            daemon.terminate()
            daemon.wait(10)


def test_a_task_on_hetzner_completes_on_a_booted_server_which_is_deleted_with_its_cost(cloud: Cloud):
    api = cloud.api
    task_id = api.submit(repo=cloud.repo_url, prompt='echo "from the cloud" > cloud.txt\n', agent="shell",
                         provider="hetzner")["task_id"]

    # The flow contract holds, in order, for a workspace on a server the fake API booted.
    events = assert_flow_completes(api, task_id, timeout_s=CALL_HOME_TIMEOUT_S + 120)
    assert branch_file(cloud.origin, f"baton/{task_id}", "cloud.txt").strip() == "from the cloud"
    types = [e["type"] for e in events]
    assert types.index("ServerRequested") < types.index("ServerCreated") < types.index("VmAgentConnected") \
        < types.index("WorkspaceReady")
    ready = next(e for e in events if e["type"] == "WorkspaceReady")["data"]
    assert ready["provider"] == "hetzner" and ready["vm_agent_url"] == f"nats:baton.vm.task.{task_id}"

    # Once the turn completed the server is deleted, its life and cost recorded.
    deleted = wait_for(lambda: [e for e in api.events(task_id) if e["type"] == "ServerDeleted"],
                       timeout_s=60, what="ServerDeleted")
    created = next(e for e in events if e["type"] == "ServerCreated")["data"]
    assert deleted[0]["data"]["server_id"] == created["server_id"] and deleted[0]["data"]["cost_eur"] > 0
    wait_for(lambda: cloud.fake.servers() == [], timeout_s=30, what="no server left in the fake")
