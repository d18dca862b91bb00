"""The vm_agent's commands, one implementation each, and the bus subscriptions that serve them.

Before its assignment a vm_agent listens on `baton.vm.member.<vm_id>.assign` with the credential
it was started (or booted) with; once assigned, on `baton.vm.task.<task_id>.*` with its task's
credential (see services/runtime/vm_agent_commands.py). A reply says accepted or refused with a
reason, never echoing a request (an assignment carries credentials).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from services.runtime.nats_fast_path import flush
from services.runtime.repo_url import RepoCredential
from services.runtime.vm_agent_commands import (
    COMMAND_BODIES, AliveProbe, Assignment, CommandReply, Hello, PermissionAnswer, RepoCredentialBody, SessionCancel,
    SessionStart, TurnStart, member_subject, task_subject,
)
from vm_agent.backends import available_backends, refusal
from vm_agent.clone import CloneError, clone_workspace
from vm_agent.permissions import PermissionDesk
from vm_agent.runner import SessionRunner
from vm_agent.state import VmAgent
from vm_agent.workspace_lock import WorkspaceTaken

log = logging.getLogger(__name__)

TURN_REFUSALS = {
    "busy": "a turn is running; the task runner sends the next one when its push is recorded",
    "out_of_order": "turns run in order: that is not the next one",
    "gone": "the session cannot take a follow-up: its last turn was not pushed or its agent is gone",
}

ANSWER_REFUSALS = {
    "unknown": (404, "no such permission request"),
    "not_offered": (422, "that option was not offered"),
    "closed": (409, "that permission request was already answered or timed out"),
}


def _repo_credential(body: RepoCredentialBody | None) -> RepoCredential | None:
    return None if body is None else RepoCredential(body.host, body.username, body.password)


class VmAgentCommands:
    """What the control plane may ask of this vm_agent; each method is the one implementation."""

    def __init__(self, vm: VmAgent) -> None:
        self.vm = vm
        self.runners: dict[str, SessionRunner] = {}

    def _serves(self, task_id: str) -> CommandReply | None:
        """A refusal if this vm_agent does not serve `task_id`."""
        if self.vm.assigned is None or task_id != self.vm.assigned.task_id:
            return CommandReply.refused(409, f"this vm_agent does not serve task {task_id}")
        return None

    async def assign(self, body: Assignment) -> CommandReply:
        vm = self.vm
        if vm.assigned is not None:
            if vm.assigned.task_id != body.task_id:
                return CommandReply.refused(409, f"this vm_agent already serves task {vm.assigned.task_id}")
            return CommandReply.ok(task_id=body.task_id, assigned_now=False)
        if body.clone is not None:  # On a machine of its own: it clones the workspace itself.
            try:
                await clone_workspace(body.clone, workspace=body.workspace, state_dir=body.state_dir,
                                      credential=_repo_credential(body.repo_credential))
            except CloneError as error:
                return CommandReply.refused(422, str(error))
        try:
            await vm.assign(body.task_id, body.workspace.resolve(), body.state_dir,
                            credential_expires_at=body.credential_expires_at, nats_credentials=body.nats_credentials,
                            repo_credential=_repo_credential(body.repo_credential))
        except ConnectionError as error:  # Unreachable, or the credential refused: say which.
            return CommandReply.refused(503, f"this vm_agent cannot publish its task's events: {error}")
        except WorkspaceTaken as error:
            return CommandReply.refused(409, str(error))
        # From now on the task's commands come on the task's own connection (its credential may).
        await serve_task_commands(vm.publisher.nc, body.task_id, self)  # type: ignore[union-attr]
        return CommandReply.ok(task_id=body.task_id, assigned_now=True)

    async def start_session(self, body: SessionStart) -> CommandReply:
        vm = self.vm
        if (refused := self._serves(body.task_id)) is not None:
            return refused
        existing = vm.session()
        if existing is not None:
            if existing.attempt_id != body.attempt_id:
                return CommandReply.refused(409, f"attempt {existing.attempt_id} already ran here")
            return CommandReply.ok(202, task_id=body.task_id, attempt_id=body.attempt_id, started_now=False)
        backend = available_backends(vm.launcher.agents_dir).get(body.agent)
        if backend is None:
            why = refusal(body.agent, vm.launcher.agents_dir, os.environ)
            return CommandReply.refused(422, f"agent {body.agent!r} is not available on this machine: {why}")
        session = vm.open_session(body.attempt_id, body.agent, body.causation_id, turn=body.turn)
        if body.permission_policy == "ask":
            vm.permissions = PermissionDesk(timeout_s=vm.permission_timeout_s)
        runner = SessionRunner(
            vm.assigned.store, session, workspace=vm.assigned.workspace, backend=backend,
            prompt=body.initial_prompt, faults=vm.faults, launcher=vm.launcher,
            warm_agent=vm.take_warm_agent(body.agent, vm.assigned.workspace),
            push_access=vm.assigned.push_access, permissions=vm.permissions,
            resume_session_id=body.resume_session_id,
        )
        vm.runs[body.attempt_id] = asyncio.get_running_loop().create_task(runner.run())
        self.runners[body.attempt_id] = runner
        return CommandReply.ok(202, task_id=body.task_id, attempt_id=body.attempt_id, started_now=True)

    async def cancel_session(self, body: SessionCancel) -> CommandReply:
        """Stop the agent mid-turn (ACP `session/cancel`, a short grace, then its process group is
        ended; AgentFinished `cancelled`, nothing pushed). A session that never started ends at once
        (this vm_agent then exits). 409 once the turn ended by itself (its push follows)."""
        vm = self.vm
        if (refused := self._serves(body.task_id)) is not None:
            return refused
        existing = vm.session()
        if existing is None:
            vm.open_session(body.attempt_id, body.agent, None).finished("cancelled", None)
            vm.assigned.store.save(vm.session())
            return CommandReply.ok(202, task_id=body.task_id, attempt_id=body.attempt_id, agent_ran=False)
        runner, run = self.runners.get(existing.attempt_id), vm.runs.get(existing.attempt_id)
        if existing.attempt_id != body.attempt_id or runner is None or run is None or not runner.cancel(run):
            return CommandReply.refused(409, "too late to cancel: the agent's turn already ended")
        return CommandReply.ok(202, task_id=body.task_id, attempt_id=body.attempt_id, agent_ran=True)

    async def start_turn(self, body: TurnStart) -> CommandReply:
        """A follow-up: the next turn in the same ACP session and agent process, once the turn
        before was pushed; repeating a turn that began starts nothing (409 while another runs)."""
        if (refused := self._serves(body.task_id)) is not None:
            return refused
        existing, runner = self.vm.session(), self.runners.get(body.attempt_id)
        if existing is None or existing.attempt_id != body.attempt_id or runner is None:
            return CommandReply.refused(409, f"no session of attempt {body.attempt_id} runs here")
        starting = runner.follow_up(body.turn, body.prompt, body.causation_id)
        if starting in TURN_REFUSALS:
            return CommandReply.refused(409, TURN_REFUSALS[starting])
        return CommandReply.ok(202, task_id=body.task_id, turn=body.turn, started_now=starting == "started")

    async def answer_permission(self, body: PermissionAnswer) -> CommandReply:
        """A person's answer to an open request; repeating the same answer changes nothing."""
        if (refused := self._serves(body.task_id)) is not None:
            return refused
        if self.vm.permissions is None:
            return CommandReply.refused(404, "this task's permission requests are not answered by people")
        answering = self.vm.permissions.answer(body.request_id, body.option_id)
        if answering in ANSWER_REFUSALS:
            return CommandReply.refused(*ANSWER_REFUSALS[answering])
        return CommandReply.ok(request_id=body.request_id, option_id=body.option_id,
                               answered_now=answering == "answered")

    async def say_alive(self, body: AliveProbe) -> CommandReply:
        """Answered while this vm_agent is on the bus: its task, and whether its session ended."""
        session = self.vm.session()
        return CommandReply.ok(task_id=self.vm.assigned.task_id if self.vm.assigned else None,
                               session_ended=bool(session and session.ended))

    def task_handlers(self) -> dict[str, Callable[[BaseModel], Awaitable[CommandReply]]]:
        """Each task command, by the last token of its subject."""
        return {"sessions": self.start_session, "turns": self.start_turn, "cancel": self.cancel_session,
                "permissions": self.answer_permission, "alive": self.say_alive}


async def answer(msg: Msg, body_type: type[BaseModel], command: Callable[..., Awaitable[CommandReply]]) -> None:
    """Parse the request, run the command, reply. A body that does not parse is a 422 naming the
    fields at fault (never their values: an assignment carries credentials)."""
    try:
        body = body_type.model_validate_json(msg.data)
    except ValidationError as error:
        fields = sorted({".".join(map(str, e["loc"])) or "body" for e in error.errors()})
        reply = CommandReply.refused(422, f"a {body_type.__name__} request is not valid: {', '.join(fields)}")
    else:
        try:
            reply = await command(body)
        except Exception as error:  # noqa: BLE001 - the caller must hear a reason, not a timeout.
            log.exception("the %s command failed", body_type.__name__)
            reply = CommandReply.refused(500, f"the vm_agent failed: {type(error).__name__}")
    if msg.reply:
        await msg.respond(reply.model_dump_json().encode())


async def serve_task_commands(nc: Client, task_id: str, commands: VmAgentCommands) -> None:
    """Answer `baton.vm.task.<task_id>.*` on the task's own connection (its credential may)."""
    handlers = commands.task_handlers()

    async def on_command(msg: Msg) -> None:
        name = msg.subject.rsplit(".", 1)[1]
        if name in handlers:
            await answer(msg, COMMAND_BODIES[name], handlers[name])
        elif msg.reply:
            await msg.respond(CommandReply.refused(404, f"no command {name!r}").model_dump_json().encode())

    await nc.subscribe(task_subject(task_id, "*"), cb=on_command)
    await flush(nc)


async def serve_assignment(member: Client, vm_id: str, commands: VmAgentCommands) -> None:
    """Take the assignment on `baton.vm.member.<vm_id>.assign`; once assigned, close the member
    connection (its work is done: the task's commands come on the task's connection)."""

    async def on_assign(msg: Msg) -> None:
        await answer(msg, Assignment, commands.assign)
        if commands.vm.assigned is not None:
            asyncio.get_running_loop().create_task(member.close())

    await member.subscribe(member_subject(vm_id, "assign"), cb=on_assign)
    await flush(member)


async def say_hello(member: Client, vm_id: str, vm: VmAgent, *, every_s: float = 10.0) -> None:
    """Once the warm agent (if any) is started or has failed, tell the provisioner this vm_agent is
    ready to be assigned; again every `every_s` until it is (a provisioner that restarted, or
    subscribed late, still learns of it)."""
    if isinstance(vm.warming, asyncio.Future):
        await asyncio.wait([vm.warming])
    while vm.assigned is None:
        hello = Hello(vm_id=vm_id, warm_agent=vm.warm_backend, warm_agent_state=vm.warm_agent_state)
        with contextlib.suppress(nats.errors.Error):  # Closed (assigned meanwhile) or reconnecting: next time.
            await member.publish(member_subject(vm_id, "hello"), hello.model_dump_json().encode())
            await flush(member)
        await asyncio.sleep(every_s)
