"""Who may say what to a vm_agent on the bus, against a real nats-server that trusts an install.

Each credential is minted exactly as the control plane mints it; each check is what the holder
observes: a subscription refused, a request that reaches no one, a message never delivered.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client

from services.runtime.nats_auth import (
    InstallAuth, Permissions, auditor_permissions, raw_credentials, service_permissions, vm_agent_permissions,
    vm_member_permissions,
)
from services.runtime.nats_fast_path import flush
from services.runtime.vm_agent_commands import CommandReply, member_subject, task_subject
from tests.support.processes import NatsServer

pytestmark = pytest.mark.capability
WAIT_S = 10.0


@pytest.fixture(scope="module")
def trusted_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, InstallAuth]]:
    root: Path = tmp_path_factory.mktemp("vm-bus")
    auth = InstallAuth(root / "baton" / "nats-auth")
    server = NatsServer(store_dir=root / "nats", trusting=root / "baton").start()
    try:
        yield server, auth
    finally:
        server.stop()


@asynccontextmanager
async def holder(server: NatsServer, auth: InstallAuth, name: str, permissions: Permissions) -> AsyncIterator[Client]:
    """A connection with a credential minted for `name`; its refusals kept in `.refusals`."""
    refusals: list[str] = []

    async def remember(error: Exception) -> None:
        refusals.append(str(error).lower())

    nc = await nats.connect(server.url, allow_reconnect=False, error_cb=remember,
                            inbox_prefix=permissions.inbox_prefix,
                            user_credentials=raw_credentials(auth.user_creds(name, permissions, ttl_s=600)))
    nc.refusals = refusals  # type: ignore[attr-defined]
    try:
        yield nc
    finally:
        await nc.close()


async def until(probe, what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not probe():
            await asyncio.sleep(0.02)


async def answering(nc: Client, subject: str, heard: list[bytes]) -> None:
    """Subscribe as a vm_agent would, answering every request it hears."""
    async def on_request(msg) -> None:
        heard.append(msg.data)
        await msg.respond(CommandReply.ok(202, heard=len(heard)).model_dump_json().encode())

    await nc.subscribe(subject, cb=on_request)
    await flush(nc)


async def answered(nc: Client, subject: str, payload: bytes):
    """The reply to a request that is allowed: asked again while the server has no responder for it
    yet (CI once saw "no responders" though the answering subscription was flushed)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            try:
                return await nc.request(subject, payload, timeout=WAIT_S)
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.05)


def recorder(into: list[str], *, unless: str = "", other: list[str] | None = None):
    """A subscription callback noting each subject (those containing `unless` into `other`)."""
    async def note(msg) -> None:
        (other if unless and unless in msg.subject and other is not None else into).append(msg.subject)
    return note


def run(scenario) -> None:
    asyncio.run(scenario())


def test_a_task_s_vm_agent_answers_its_own_commands_from_the_task_runner(trusted_nats):
    server, auth = trusted_nats
    task = secrets.token_hex(8)

    async def scenario() -> None:
        async with holder(server, auth, f"vm_agent-{task}", vm_agent_permissions(task)) as vm, \
                holder(server, auth, "task-runner", service_permissions("task-runner")) as runner:
            heard: list[bytes] = []
            await answering(vm, task_subject(task, "*"), heard)
            reply = await answered(runner, task_subject(task, "sessions"), b'{"hello": 1}')
            # The answer came back through the response permission alone.
            assert CommandReply.model_validate_json(reply.data).accepted
            assert heard == [b'{"hello": 1}']
            assert vm.refusals == [], vm.refusals

    run(scenario)


def test_a_vm_agent_s_credential_cannot_hear_another_task_s_commands_nor_publish_for_it(trusted_nats):
    server, auth = trusted_nats
    mine, victim = secrets.token_hex(8), secrets.token_hex(8)

    async def scenario() -> None:
        async with holder(server, auth, f"vm_agent-{mine}", vm_agent_permissions(mine)) as vm, \
                holder(server, auth, "auditor", auditor_permissions()) as reader:
            # Subscribing to the victim's commands is refused by the server.
            await vm.subscribe(task_subject(victim, "*"))
            await flush(vm)
            await until(lambda: any("permissions violation for subscription" in r for r in vm.refusals),
                        "the subscription refused")
            # Publishing the victim's events or commands is refused; a reader hears none of it.
            seen: list[str] = []
            await reader.subscribe("baton.task.>", cb=recorder(seen))
            await flush(reader)
            await vm.publish(f"baton.task.{victim}.AgentOutput", b"{}")
            await vm.publish(task_subject(victim, "sessions"), b"{}")
            await vm.publish(f"baton.task.{mine}.AgentOutput", b"{}")  # its own: delivered, last
            await flush(vm)
            # The server says so (how many of its -ERRs the client reports under load is the client's
            # business); what it let through is what the reader hears, below.
            await until(lambda: any("permissions violation for publish" in r for r in vm.refusals),
                        "the publishes refused")
            # One connection's messages arrive in order: once its own is seen, nothing else came.
            await until(lambda: f"baton.task.{mine}.AgentOutput" in seen, "its own event delivered")
            assert seen == [f"baton.task.{mine}.AgentOutput"]

    run(scenario)


def test_a_service_without_the_right_cannot_send_a_vm_agent_a_command(trusted_nats):
    server, auth = trusted_nats
    task = secrets.token_hex(8)

    async def scenario() -> None:
        async with holder(server, auth, f"vm_agent-{task}", vm_agent_permissions(task)) as vm, \
                holder(server, auth, "gateway", service_permissions("gateway")) as gateway, \
                holder(server, auth, "task-runner", service_permissions("task-runner")) as runner:
            heard: list[bytes] = []
            await answering(vm, task_subject(task, "*"), heard)
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await gateway.request(task_subject(task, "cancel"), b"from the gateway", timeout=1)
            assert any("permissions violation for publish" in r for r in gateway.refusals), gateway.refusals
            # The task runner's request, sent after, is the first and only one the vm_agent heard.
            await answered(runner, task_subject(task, "cancel"), b"from the task runner")
            assert heard == [b"from the task runner"]

    run(scenario)


def test_a_member_takes_only_its_own_assignment_and_only_the_provisioner_sends_it(trusted_nats):
    server, auth = trusted_nats
    vm_id, other = f"vm-{secrets.token_hex(4)}", f"vm-{secrets.token_hex(4)}"

    async def scenario() -> None:
        async with holder(server, auth, f"vm_member-{vm_id}", vm_member_permissions(vm_id)) as member, \
                holder(server, auth, "provisioner", service_permissions("provisioner")) as provisioner, \
                holder(server, auth, "task-runner", service_permissions("task-runner")) as runner:
            heard: list[bytes] = []
            await answering(member, member_subject(vm_id, "assign"), heard)
            # It may not listen for another member's assignment, nor speak for another.
            await member.subscribe(member_subject(other, "assign"))
            await member.publish(member_subject(other, "hello"), b"{}")
            await flush(member)
            await until(lambda: len([r for r in member.refusals if "permissions violation" in r]) >= 2,
                        "both refused")
            # The task runner may not assign; the provisioner may.
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await runner.request(member_subject(vm_id, "assign"), b"from the task runner", timeout=1)
            reply = await answered(provisioner, member_subject(vm_id, "assign"), b"from the provisioner")
            assert CommandReply.model_validate_json(reply.data).accepted
            assert heard == [b"from the provisioner"]

    run(scenario)


def test_no_control_plane_reader_hears_an_assignment_or_a_command(trusted_nats):
    server, auth = trusted_nats
    vm_id, task = f"vm-{secrets.token_hex(4)}", secrets.token_hex(8)

    async def scenario() -> None:
        async with holder(server, auth, f"vm_member-{vm_id}", vm_member_permissions(vm_id)) as member, \
                holder(server, auth, f"vm_agent-{task}", vm_agent_permissions(task)) as vm, \
                holder(server, auth, "provisioner", service_permissions("provisioner")) as provisioner, \
                holder(server, auth, "task-runner", service_permissions("task-runner")) as runner, \
                holder(server, auth, "gateway", service_permissions("gateway")) as gateway, \
                holder(server, auth, "auditor", auditor_permissions()) as reader:
            overheard: list[str] = []
            hellos: list[str] = []
            for nc in (gateway, reader, runner):
                await nc.subscribe(">", cb=recorder(overheard))
            await provisioner.subscribe(">", cb=recorder(overheard, unless=".hello", other=hellos))
            for nc in (gateway, reader, runner, provisioner):
                await flush(nc)
            await answering(member, member_subject(vm_id, "assign"), [])
            await answering(vm, task_subject(task, "*"), [])
            await answered(provisioner, member_subject(vm_id, "assign"), b"secret creds")
            await answered(runner, task_subject(task, "sessions"), b"a prompt")
            await member.publish(member_subject(vm_id, "hello"), b"{}")
            await flush(member)
            # The provisioner hears the hello (sent after both requests): by then anything
            # overheard would have been delivered.
            await until(lambda: hellos == [member_subject(vm_id, "hello")], "the provisioner hears the hello")
            assert [s for s in overheard if s.startswith("baton.vm.")] == []

    run(scenario)
