"""The vm_agent's bus commands: refusals keep the HTTP codes' meaning, and a reply never echoes
what it was sent (an assignment carries credentials)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from services.runtime.nats_auth import service_permissions, vm_agent_permissions
from services.runtime.vm_agent_commands import (
    COMMAND_BODIES, TASK_COMMANDS, Assignment, CommandReply, PermissionAnswer, SessionCancel, SessionStart,
    TurnStart, member_subject, task_address, task_subject,
)
from vm_agent.commands import VmAgentCommands, answer
from vm_agent.state import VmAgent

SECRET = "-----BEGIN NATS USER JWT-----sekrit"


@dataclass
class RecordedMsg:
    """What a handler sees of a NATS request, and what it answered."""

    data: bytes
    subject: str = "baton.vm.member.vm-1.assign"
    reply: str = "_INBOX.x"
    answers: list[bytes] = field(default_factory=list)

    async def respond(self, data: bytes) -> None:
        self.answers.append(data)


async def _no_bus(task_id: str, credentials: str | None):
    raise ConnectionError("nats at nats://127.0.0.1:1 refused the credential")


def _commands() -> VmAgentCommands:
    return VmAgentCommands(VmAgent("", _no_bus, frozenset(), launcher=None))


def _reply(msg: RecordedMsg) -> CommandReply:
    [data] = msg.answers
    return CommandReply.model_validate_json(data)


def test_an_assignment_that_does_not_parse_is_refused_naming_fields_never_values():
    msg = RecordedMsg(data=b'{"task_id": "bad.id", "nats_credentials": "%s"}' % SECRET.encode())
    asyncio.run(answer(msg, Assignment, _commands().assign))
    reply = _reply(msg)
    assert reply.status == 422 and "task_id" in reply.reason and "workspace" in reply.reason
    assert SECRET not in msg.answers[0].decode()


def test_an_assignment_whose_bus_credential_is_refused_is_a_503_saying_so(tmp_path):
    body = Assignment(task_id="t1", workspace=tmp_path, state_dir=tmp_path / "s", credential_expires_at=1e10,
                      nats_credentials=SECRET)
    msg = RecordedMsg(data=body.model_dump_json().encode())
    asyncio.run(answer(msg, Assignment, _commands().assign))
    reply = _reply(msg)
    assert reply.status == 503 and "cannot publish its task's events" in reply.reason
    assert SECRET not in msg.answers[0].decode()


@pytest.mark.parametrize("name,body", [
    ("sessions", SessionStart(task_id="t1", agent="shell", initial_prompt="p", attempt_id="t1")),
    ("cancel", SessionCancel(task_id="t1", attempt_id="t1", agent="shell")),
    ("turns", TurnStart(task_id="t1", attempt_id="t1", turn=2, prompt="p")),
    ("permissions", PermissionAnswer(task_id="t1", request_id="r1", option_id="once")),
])
def test_a_task_command_to_an_unassigned_vm_agent_is_a_409(name: str, body):
    commands = _commands()
    msg = RecordedMsg(data=body.model_dump_json().encode(), subject=task_subject("t1", name))
    asyncio.run(answer(msg, COMMAND_BODIES[name], commands.task_handlers()[name]))
    reply = _reply(msg)
    assert (reply.status, reply.reason, reply.accepted) == (409, "this vm_agent does not serve task t1", False)


def test_every_task_command_has_a_body_and_a_handler():
    assert set(TASK_COMMANDS) == set(COMMAND_BODIES) == set(_commands().task_handlers())


def test_a_task_s_address_names_its_command_subjects():
    assert task_address("t1") == "nats:baton.vm.task.t1"
    assert task_subject("t1", "sessions") == "baton.vm.task.t1.sessions"
    assert member_subject("vm-1", "assign") == "baton.vm.member.vm-1.assign"


def test_only_the_task_runner_and_the_provisioner_may_send_vm_agents_commands():
    def publishes(service: str) -> list[str]:
        return [s for s in service_permissions(service).publish if s.startswith("baton.vm.")]

    assert publishes("task-runner") == ["baton.vm.task.*.*"]
    assert publishes("provisioner") == ["baton.vm.member.*.assign", "baton.vm.task.*.alive"]
    assert publishes("gateway") == []


def test_a_vm_agent_s_credential_answers_its_own_task_s_commands_only():
    permissions = vm_agent_permissions("t1")
    claims = permissions.claims()
    assert "baton.vm.task.t1.*" in claims["sub"]["allow"]
    assert claims["resp"]["max"] == 1
    assert not any(s.startswith("baton.vm.") for s in claims["pub"]["allow"])


def test_an_alive_probe_is_answered_with_the_vm_agent_s_task():
    msg = RecordedMsg(data=b"{}", subject=task_subject("t1", "alive"))
    asyncio.run(answer(msg, COMMAND_BODIES["alive"], _commands().task_handlers()["alive"]))
    reply = _reply(msg)
    assert reply.accepted and reply.result == {"task_id": None, "session_ended": False}
