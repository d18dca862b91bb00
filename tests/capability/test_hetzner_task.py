"""A task on `hetzner` runs end to end as a user runs one: `baton up` with the Hetzner provider
configured against the fake API, whose servers boot by running their user_data in a network
namespace of their own. The VM's vm_agent (installed by cloud-init from the control plane) calls
home over the bus with its scoped credential, clones the repo from a git origin it reaches over the
network, runs the agent and pushes; the server is deleted afterwards with its cost on the record.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.api import Api
from tests.support.fake_hetzner import FakeHetzner, NetnsBooter, netns_available
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_file, make_origin, push_file
from tests.support.processes import BatonStack, NatsServer, free_port, nats_server_binary
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

TOKEN = "hc-task-test-token-" + "5" * 24
CALL_HOME_TIMEOUT_S = 240
NEVER_BOOTS_TIMEOUT_S = 5
CALL_HOME_DEADLINE_S = 2
"""The flow monitor's VmAgentConnected deadline where servers never boot: the gap is named first."""


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


def hetzner_env(fake: FakeHetzner, *, vm_host: str, nats_port: int, gateway_port: int,
                call_home_timeout_s: float) -> dict[str, str]:
    """`baton up`'s Hetzner configuration: the fake API, and the bus and gateway as the VMs reach them."""
    return {
        "BATON_HCLOUD_TOKEN": TOKEN, "BATON_HCLOUD_ENDPOINT": fake.endpoint, "BATON_HCLOUD_LOCATIONS": "fsn1",
        "BATON_VM_NATS_URL": f"nats://{vm_host}:{nats_port}", "BATON_VM_GATEWAY_URL": f"http://{vm_host}:{gateway_port}",
        "BATON_HOST": "0.0.0.0", "BATON_ALLOWED_HOSTS": vm_host, "BATON_REPO_SCHEMES": "git,file",
        "BATON_VM_CALL_HOME_TIMEOUT_S": str(call_home_timeout_s), "BATON_HCLOUD_REAP_EVERY_S": "5",
        "BATON_LINGER_S": "2",  # a VM's vm_agent waits this long for a follow-up, then leaves: its server goes
    }


@contextmanager
def baton_up_on(root: Path, fake: FakeHetzner, *, vm_host: str, call_home_timeout_s: float,
                extra_env: dict[str, str] | None = None) -> Iterator[BatonStack]:
    nats = BridgedNats(store_dir=root / "nats", trusting=root / "baton").start()
    port = free_port()
    env = hetzner_env(fake, vm_host=vm_host, nats_port=nats.port, gateway_port=port,
                      call_home_timeout_s=call_home_timeout_s) | (extra_env or {})
    stack = BatonStack(nats=nats, data_dir=root / "baton", extra_env=env, port=port)
    try:
        yield stack.start()
    finally:
        stack.stop()
        nats.stop()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """`baton up` whose hetzner servers boot (NetnsBooter) and reach it, and the origin, over the bridge."""
    if problem := netns_available():
        pytest.skip(problem)
    root = tmp_path_factory.mktemp("hetzner-task")
    with FakeHetzner(token=TOKEN) as fake, NetnsBooter(root / "vms", image_python=Path(sys.executable)) as vms:
        fake.state.boot, fake.state.halt = vms.boot, vms.halt
        origin = make_origin(root / "git")
        daemon, git_base = git_daemon(root / "git", vms.host_address)
        try:
            with baton_up_on(root, fake, vm_host=vms.host_address, call_home_timeout_s=CALL_HOME_TIMEOUT_S) as stack:
                yield Cloud(fake, vms, stack, origin, f"{git_base}/origin.git")
        finally:
            daemon.terminate()
            daemon.wait(10)


@pytest.fixture(scope="module")
def dead_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeHetzner, BatonStack]]:
    """`baton up` on a fake whose servers never boot, with a short call-home deadline."""
    root = tmp_path_factory.mktemp("hetzner-dead")
    with FakeHetzner(token=TOKEN) as fake, \
            baton_up_on(root, fake, vm_host="127.0.0.1", call_home_timeout_s=NEVER_BOOTS_TIMEOUT_S,
                        extra_env={"BATON_DEADLINES": f"VmAgentConnected={CALL_HOME_DEADLINE_S}"}) as stack:
        yield fake, stack


def test_a_task_on_hetzner_completes_on_a_booted_server_which_is_deleted_with_its_cost(cloud: Cloud):
    api = cloud.api
    prompt = ('echo "from the cloud" > cloud.txt\n'
              'echo "user_data seen: $(ls /var/lib/cloud/instance 2>/dev/null | wc -l)"\n')
    task_id = api.submit(repo=cloud.repo_url, prompt=prompt, agent="shell", provider="hetzner")["task_id"]

    # The flow contract holds, in order, for a workspace on a server the fake API booted.
    events = assert_flow_completes(api, task_id, timeout_s=CALL_HOME_TIMEOUT_S + 120)
    assert branch_file(cloud.origin, f"baton/{task_id}", "cloud.txt").strip() == "from the cloud"
    types = [e["type"] for e in events]
    assert types.index("ServerRequested") < types.index("ServerCreated") < types.index("VmAgentConnected") \
        < types.index("WorkspaceReady")
    ready = next(e for e in events if e["type"] == "WorkspaceReady")["data"]
    assert ready["provider"] == "hetzner" and ready["vm_agent_url"] == f"nats:baton.vm.task.{task_id}"
    # The agent cannot read cloud-init's copy of the user_data (the vm_agent's member credential).
    said = [e["data"]["text"].strip() for e in events if e["type"] == "AgentOutput"]
    assert "user_data seen: 0" in said, said

    # Once the turn completed and its vm_agent left (no follow-up came), the workspace is released
    # and the server deleted, its life and cost recorded.
    deleted = wait_for(lambda: [e for e in api.events(task_id) if e["type"] == "ServerDeleted"],
                       timeout_s=60, what="ServerDeleted")
    created = next(e for e in events if e["type"] == "ServerCreated")["data"]
    assert deleted[0]["data"]["server_id"] == created["server_id"] and deleted[0]["data"]["cost_eur"] > 0
    # The board (API, `baton tasks`) says what the task cost.
    cost = wait_for(lambda: api.task(task_id).get("cost_eur"), timeout_s=30, what="the task's cost on the board")
    assert cost == pytest.approx(deleted[0]["data"]["cost_eur"])
    assert "WorkspaceReleased" in [e["type"] for e in api.events(task_id)]  # a follow-up would re-provision
    wait_for(lambda: cloud.fake.servers() == [], timeout_s=30, what="no server left in the fake")


def test_a_server_that_never_boots_fails_the_task_naming_the_missing_handoff_and_is_deleted(dead_cloud):
    fake, stack = dead_cloud
    api = Api(stack.api, stack.token)
    task_id = api.submit(repo="file:///nowhere.git", prompt="echo hi\n", agent="shell", provider="hetzner")["task_id"]

    # Its vm_agent never calls home: within the configured deadline the task fails naming the gap.
    events = api.wait_for_end(task_id, timeout_s=NEVER_BOOTS_TIMEOUT_S + 60)
    failed = next(e for e in events if e["type"] == "TaskFailed")["data"]["reason"]
    assert f"did not call home within {NEVER_BOOTS_TIMEOUT_S} s (VmAgentConnected missing after ServerCreated)" \
        in failed
    created = next(e for e in events if e["type"] == "ServerCreated")["data"]
    # The flow monitor named the gap too, as a handoff of the flow: VmAgentConnected after ServerCreated.
    overdue = [e["data"] for e in events if e["type"] == "StepOverdue"]
    assert [(o["expected"], o["after"]) for o in overdue] == [("VmAgentConnected", "ServerCreated")], overdue
    # …and its server is deleted, on the record and in the API.
    deleted = wait_for(lambda: [e["data"] for e in api.events(task_id) if e["type"] == "ServerDeleted"],
                       timeout_s=30, what="ServerDeleted")
    assert deleted[0]["server_id"] == created["server_id"] and "did not call home" in deleted[0]["reason"]
    assert fake.servers() == []


def test_a_bad_token_fails_the_task_at_once_saying_so(dead_cloud):
    fake, stack = dead_cloud
    api = Api(stack.api, stack.token)
    fake.state.token = "a-token-the-install-does-not-have"  # the install's token is refused from now on
    try:
        started = time.monotonic()
        task_id = api.submit(repo="file:///nowhere.git", prompt="echo hi\n", agent="shell",
                             provider="hetzner")["task_id"]
        events = api.wait_for_end(task_id, timeout_s=30)
    finally:
        fake.state.token = TOKEN
    failed = next(e for e in events if e["type"] == "TaskFailed")["data"]["reason"]
    assert "Hetzner refused the API token (unauthorized): check BATON_HCLOUD_TOKEN" in failed
    assert time.monotonic() - started < 30 and "ServerCreated" not in [e["type"] for e in events]


def test_a_provisioner_killed_between_create_and_created_leaves_no_server_and_the_task_completes(cloud: Cloud):
    api = cloud.api
    cloud.fake.state.action_polls = 10**9  # the create action never finishes while the provisioner waits in it
    try:
        task_id = api.submit(repo=cloud.repo_url, prompt='echo "again" > again.txt\n', agent="shell",
                             provider="hetzner")["task_id"]
        [first] = wait_for(lambda: cloud.fake.servers(), timeout_s=60, what="the create call")
        cloud.stack.kill_service("provisioner")  # kill -9 between "create" and "created"
    finally:
        cloud.fake.state.action_polls = 1

    # The restarted provisioner replaces the leftover server; the task completes on the new one.
    assert_flow_completes(api, task_id, timeout_s=CALL_HOME_TIMEOUT_S + 120)
    assert branch_file(cloud.origin, f"baton/{task_id}", "again.txt").strip() == "again"
    wait_for(lambda: cloud.fake.servers() == [], timeout_s=60, what="no server left in the fake")
    assert first["id"] in [s["id"] for s in cloud.fake.state.deleted]


def test_a_vm_killed_mid_run_is_a_lost_workspace_its_server_deleted_and_a_new_attempt_completes(cloud: Cloud):
    api = cloud.api
    # Attempt 1's agent waits until it is killed; attempt 2 clones `main` after the kill, which
    # then has halted.txt, so it writes its file at once (no fixed sleep to wait out).
    prompt = 'until [ -e halted.txt ]; do sleep 0.5; done\necho "survived" > lost.txt\n'
    task_id = api.submit(repo=cloud.repo_url, prompt=prompt, agent="shell", provider="hetzner")["task_id"]
    wait_for(lambda: any(e["type"] == "PromptDelivered" for e in api.events(task_id)), timeout_s=CALL_HOME_TIMEOUT_S,
             what="the prompt delivered on the VM")
    [server] = [s for s in cloud.fake.servers() if s["labels"]["baton.task"] == task_id]
    cloud.vms.halt(server)  # kill -9 of everything on the "VM"
    push_file(cloud.origin, "main", "halted.txt", "the first attempt's VM was halted\n")

    # The vm_agent no longer answers on the bus: its run is lost, its server deleted, attempt 2 completes.
    events = wait_for(lambda: (lambda es: es if any(e["type"] == "TaskCompleted" for e in es) else None)(
        api.events(task_id)), timeout_s=CALL_HOME_TIMEOUT_S + 120, what="the task to complete on attempt 2")
    lost = next(e for e in events if e["type"] == "SessionFailed")["data"]
    assert lost["lost_workspace"] is True and "stopped answering on the bus" in lost["reason"]
    assert next(e for e in events if e["type"] == "AttemptStarted")["data"]["attempt"] == 2
    assert any(e["type"] == "ServerDeleted" and e["data"]["server_id"] == server["id"] for e in api.events(task_id))
    assert branch_file(cloud.origin, f"baton/{task_id}", "lost.txt").strip() == "survived"
    wait_for(lambda: cloud.fake.servers() == [], timeout_s=60, what="no server left in the fake")


def test_the_hetzner_token_appears_nowhere(cloud: Cloud):
    # Events of every task, the stores and logs in the data dir, and every server's user_data.
    api = cloud.api
    for task in api.http.get("/api/tasks").json()["tasks"]:
        assert TOKEN not in str(api.events(task["task_id"]))
    for path in cloud.stack.data_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    for server in [*cloud.fake.servers(), *cloud.fake.state.deleted]:
        assert TOKEN not in (cloud.fake.user_data_of(server["id"]) or "")
    assert cloud.fake.state.deleted  # (there were servers to look at)
