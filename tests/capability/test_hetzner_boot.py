"""A Hetzner server boots as a real one would: the fake API "starts" it by running its user_data in a
network namespace of its own, which fetches the vm_agent from a control plane over the network only,
and that vm_agent calls home over the bus with its member credential. And a provisioner killed
between "create" and "created" leaves no server behind.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import uvicorn
from fastapi import FastAPI

from events import ServerCreated, ServerRequested, VmAgentConnected
from services.gateway.routes import vm_agent_dist
from services.provisioner.cloud_init import vm_agent_artifact
from services.provisioner.hetzner import HetznerConfig, HetznerProvider, install_id
from services.provisioner.providers import WorkspaceOrder
from services.provisioner.reaper import Reaper
from services.provisioner.members import MemberBus
from services.runtime.nats_auth import InstallAuth, install_auth_dir, vm_member_credentials
from services.runtime.settings import Settings
from tests.support.fake_hetzner import FakeHetzner, NetnsBooter, netns_available
from tests.support.processes import free_port, nats_server_binary
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

SECRET = "boot-test-install-secret"
TOKEN = "hc-boot-test-token-" + "7" * 20
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake() -> Iterator[FakeHetzner]:
    with FakeHetzner(token=TOKEN) as api:
        yield api


@pytest.fixture
def booter(fake: FakeHetzner, tmp_path: Path) -> Iterator[NetnsBooter]:
    problem = netns_available()
    if problem:
        pytest.skip(problem)
    with NetnsBooter(tmp_path / "vms", image_python=Path(sys.executable)) as vms:
        fake.state.boot, fake.state.halt = vms.boot, vms.halt
        yield vms


@pytest.fixture
def control_plane(booter: NetnsBooter, tmp_path: Path) -> Iterator[str]:
    """The gateway's vm_agent route, served on the address the VMs reach (the bridge), not loopback."""
    app = FastAPI()
    app.include_router(vm_agent_dist.router)
    app.state.gateway = SimpleNamespace(settings=Settings(data_dir=tmp_path / "baton", secret=SECRET))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=booter.host_address, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout_s=20, what="the test control plane")
    try:
        yield f"http://{booter.host_address}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def provider_for(fake: FakeHetzner, gateway_url: str, recorded: list, *,
                 nats_url: str = "tls://nats.example.com:4222", calls_home=None) -> HetznerProvider:
    config = HetznerConfig(token=TOKEN, endpoint=fake.endpoint, server_type="cx22", image="ubuntu-24.04",
                           locations=("fsn1",), install_id=install_id(SECRET), gateway_url=gateway_url,
                           nats_url=nats_url, credential_ttl_s=600, poll_interval_s=0.05,
                           call_home_timeout_s=240)
    return HetznerProvider(config, secret=SECRET, record=lambda task, event: recorded.append(event),
                           calls_home=calls_home or (lambda workspace_id: {"BATON_VM_ID": workspace_id}))


@pytest.fixture
def vm_bus(booter: NetnsBooter, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    """A nats-server trusting the install's operator, on the address the VMs reach (not loopback)."""
    settings = Settings(data_dir=tmp_path / "baton", secret=SECRET)
    config = tmp_path / "nats.conf"
    config.write_text(InstallAuth(install_auth_dir(settings)).server_config(store_dir=tmp_path / "nats"))
    port = free_port()
    server = subprocess.Popen([nats_server_binary(), "-c", str(config), "-a", booter.host_address, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"nats://{booter.host_address}:{port}", settings
    finally:
        server.terminate()
        server.wait(10)


async def test_a_booted_server_fetches_the_control_planes_vm_agent_over_the_network_only(fake, booter, control_plane):
    placement = await provider_for(fake, control_plane, []).provision(
        WorkspaceOrder(task_id="feedfacecafebeef", repo="https://git.example.com/r.git", base_branch=None,
                       agent="shell"))
    disk = booter.disk(placement.server_id)
    output = disk / "var/log/cloud-init-output.log"
    # The user_data ran in the VM and says it started the vm_agent of our version.
    version = vm_agent_artifact().version
    wait_for(lambda: f"baton vm_agent {version} started" in output.read_text(), timeout_s=240,
             what=f"the VM's user_data to finish (its output: {output})")
    # It fetched exactly the control plane's artifact, with its credential, over the bridge.
    fetched = (disk / "opt/baton/vm_agent.tar.gz").read_bytes()
    assert hashlib.sha256(fetched).digest() == hashlib.sha256(vm_agent_artifact().data).digest()
    with tarfile.open(disk / "opt/baton/vm_agent.tar.gz") as tar:
        assert "vm_agent/main.py" in tar.getnames() and "events/catalog.py" in tar.getnames()
    assert (disk / "opt/baton/app/vm_agent/main.py").exists()
    assert not (disk / "opt/baton/dist-auth").exists()  # the credential file is gone once used
    # The VM's loopback is its own: the host's 127.0.0.1 is unreachable from it.
    namespace = f"bhz{booter.tag}-{placement.server_id}"
    probe = subprocess.run(["ip", "netns", "exec", namespace, "curl", "-sS", "-m", "3",
                            f"http://127.0.0.1:{fake.endpoint.rsplit(':', 1)[1]}"], capture_output=True, text=True)
    assert probe.returncode != 0


async def test_a_booted_servers_vm_agent_calls_home_over_the_bus_with_its_member_credential(
        fake, booter, control_plane, vm_bus):
    nats_url, settings = vm_bus
    # The provisioner's side of the bus (it alone hears the vm_agents' hellos), on the VMs' NATS.
    members = MemberBus(settings.model_copy(update={"nats_url": nats_url}))
    await members.connected()
    recorded: list = []
    try:
        provider = provider_for(fake, control_plane, recorded, nats_url=nats_url, calls_home=lambda workspace_id: {
            "BATON_VM_ID": workspace_id, "BATON_VM_AGENT_CREDS": vm_member_credentials(settings, workspace_id)})
        provider._expect_hello = members.expect_hello
        placement = await provider.provision(WorkspaceOrder(
            task_id="0badc0de0badc0de", repo="https://git.example.com/r.git", base_branch=None, agent="shell"))
    finally:
        await members.close()
    # The vm_agent the user_data installed connected out and said hello under its workspace's identity.
    assert [type(e) for e in recorded] == [ServerRequested, ServerCreated, VmAgentConnected]
    assert recorded[-1].workspace_id == placement.workspace_id == "hetzner-0badc0de0badc0de"
    assert recorded[-1].version == vm_agent_artifact().version


async def test_a_provisioner_killed_between_create_and_created_leaves_no_server(fake, tmp_path):
    fake.state.action_polls = 10**9  # the create action never finishes: the provisioner waits in it
    script = tmp_path / "provision.py"
    script.write_text(
        "import asyncio, sys\n"
        "from services.provisioner.hetzner import HetznerConfig, HetznerProvider, install_id\n"
        "from services.provisioner.providers import WorkspaceOrder\n"
        f"config = HetznerConfig(token=sys.argv[1], endpoint={fake.endpoint!r}, server_type='cx22',\n"
        "    image='ubuntu-24.04', locations=('fsn1',), install_id=install_id('" + SECRET + "'),\n"
        "    gateway_url='https://g', nats_url='tls://n:4222', credential_ttl_s=600, poll_interval_s=0.05)\n"
        "provider = HetznerProvider(config, secret='" + SECRET + "', record=lambda task, event: None)\n"
        "asyncio.run(provider.provision(WorkspaceOrder('abcdefabcdef0123', 'https://g/r.git', None, 'shell')))\n")
    provisioner = subprocess.Popen([sys.executable, str(script), TOKEN], cwd=REPO_ROOT,
                                   env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        # The server exists (the create call returned) while the provisioner polls its action.
        wait_for(lambda: fake.servers(), timeout_s=30, what="the killed provisioner's create call")
        os.kill(provisioner.pid, signal.SIGKILL)
    finally:
        provisioner.kill()
        provisioner.wait(10)
    fake.state.action_polls = 1
    [left] = fake.servers()
    assert left["labels"]["baton.task"] == "abcdefabcdef0123"  # labelled from the create call on

    # The task is still wanted: provisioning again replaces the leftover instead of adding a second.
    recorded: list = []
    provider = provider_for(fake, "https://g", recorded)
    placement = await provider.provision(WorkspaceOrder("abcdefabcdef0123", "https://g/r.git", None, "shell"))
    assert [s["id"] for s in fake.servers()] == [placement.server_id] != [left["id"]]
    assert any(getattr(e, "reason", "").startswith("left by an interrupted creation") for e in recorded)
    # The task ends without releasing it (its provisioner killed again): the reaper deletes it.
    assert [m.machine_id for m in await Reaper(provider, set, every_s=60).reap_once()] == [placement.server_id]
    assert fake.servers() == []
