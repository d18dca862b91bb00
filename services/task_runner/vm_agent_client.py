"""How the task runner asks a workspace's vm_agent to act: NATS requests on the task's subjects.

The vm_agent listens nowhere; it answers `baton.vm.task.<task_id>.<command>` with its task's own
credential (services/runtime/vm_agent_commands.py). Each reply is accepted or refused with a
reason, which AgentStartRefused carries.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import nats.errors
from nats.aio.client import Client
from pydantic import BaseModel

from services.runtime.vm_agent_commands import (
    CommandReply, PermissionAnswer, SessionCancel, SessionStart, TurnStart, task_address, task_subject,
)


class AgentStartRefused(Exception):
    """The vm_agent could not be reached or refused to start the agent; str() says why."""


class VmAgentSilent(AgentStartRefused):
    """A vm_agent subscribed to the command did not answer in time (after the retries): it may
    have taken the command, so nothing may be decided as if it had refused; ask it again later
    (each command is idempotent by its key)."""


class AgentStarter(Protocol):
    async def start_agent_with_prompt(
        self, vm_agent_url: str, *, task_id: str, agent: str, prompt: str, attempt_id: str,
        causation_id: str, token_expires_at: float | None = None, permission_policy: str = "auto",
        turn: int = 1, resume_session_id: str | None = None,
    ) -> None: ...

    async def answer_permission(
        self, vm_agent_url: str, *, task_id: str, request_id: str, option_id: str,
        token_expires_at: float | None = None,
    ) -> None: ...

    async def cancel_session(
        self, vm_agent_url: str, *, task_id: str, attempt_id: str, agent: str,
        token_expires_at: float | None = None,
    ) -> bool: ...

    async def start_turn(
        self, vm_agent_url: str, *, task_id: str, attempt_id: str, turn: int, prompt: str,
        causation_id: str, token_expires_at: float | None = None,
    ) -> None: ...


class VmAgentClient:
    """Sends a task's vm_agent its commands over the bus.

    `vm_agent_url` is the address WorkspaceReady announced (`nats:baton.vm.task.<task_id>`); one
    naming another task, or HTTP, is refused. `token_expires_at` is when the workspace's bus
    credential expires: after it, nothing is sent (the vm_agent can no longer hear it). Each
    command is idempotent by its key (attempt id, turn, request id), so a repeat starts nothing.
    """

    def __init__(self, nc: Client, *, attempts: int = 4, timeout_s: float = 10.0) -> None:
        self._nc = nc
        self._attempts = attempts
        self._timeout_s = timeout_s

    async def start_agent_with_prompt(
        self, vm_agent_url: str, *, task_id: str, agent: str, prompt: str, attempt_id: str,
        causation_id: str, token_expires_at: float | None = None, permission_policy: str = "auto",
        turn: int = 1, resume_session_id: str | None = None,
    ) -> None:
        """Start the agent (restoring the task's earlier ACP session `resume_session_id` where it
        can) and deliver the prompt as turn `turn`; a vm_agent not (yet) on the bus is asked again."""
        body = SessionStart(task_id=task_id, agent=agent, initial_prompt=prompt, attempt_id=attempt_id,
                            causation_id=causation_id, permission_policy=permission_policy, turn=turn,
                            resume_session_id=resume_session_id)
        reply = await self._ask(vm_agent_url, "sessions", body, token_expires_at, retries=self._attempts)
        if not reply.accepted:
            raise AgentStartRefused(f"vm_agent refused to start the agent ({reply.status}): {reply.reason}")

    async def answer_permission(
        self, vm_agent_url: str, *, task_id: str, request_id: str, option_id: str,
        token_expires_at: float | None = None,
    ) -> None:
        """Hand a person's answer to the waiting agent (idempotent per request); raises
        AgentStartRefused saying why it was not taken."""
        body = PermissionAnswer(task_id=task_id, request_id=request_id, option_id=option_id)
        reply = await self._ask(vm_agent_url, "permissions", body, token_expires_at)
        if not reply.accepted:
            raise AgentStartRefused(f"vm_agent refused the answer ({reply.status}): {reply.reason}")

    async def cancel_session(
        self, vm_agent_url: str, *, task_id: str, attempt_id: str, agent: str,
        token_expires_at: float | None = None,
    ) -> bool:
        """True once the vm_agent is stopping the agent (it records AgentFinished `cancelled`),
        False if the turn had already ended (too late to stop the push); raises AgentStartRefused
        when the vm_agent cannot be reached or refuses."""
        body = SessionCancel(task_id=task_id, attempt_id=attempt_id, agent=agent)
        reply = await self._ask(vm_agent_url, "cancel", body, token_expires_at)
        if reply.accepted:
            return True
        if reply.status == 409:
            return False
        raise AgentStartRefused(f"vm_agent refused the cancel ({reply.status}): {reply.reason}")

    async def start_turn(
        self, vm_agent_url: str, *, task_id: str, attempt_id: str, turn: int, prompt: str,
        causation_id: str, token_expires_at: float | None = None,
    ) -> None:
        """Run a follow-up as turn `turn` (the idempotency key: a turn that began is not started
        again); raises AgentStartRefused saying why not."""
        body = TurnStart(task_id=task_id, attempt_id=attempt_id, turn=turn, prompt=prompt,
                         causation_id=causation_id)
        reply = await self._ask(vm_agent_url, "turns", body, token_expires_at)
        if not reply.accepted:
            raise AgentStartRefused(f"vm_agent refused turn {turn} ({reply.status}): {reply.reason}")

    async def _ask(self, address: str, command: str, body: BaseModel, expires_at: float | None, *,
                   retries: int = 1) -> CommandReply:
        """The vm_agent's reply, asked up to `retries` times; raises VmAgentSilent if any request
        timed out (the vm_agent may have acted), else AgentStartRefused (nobody answers: it is gone)."""
        task_id = body.task_id  # type: ignore[attr-defined]
        if address != task_address(task_id):
            raise AgentStartRefused(f"the workspace's vm_agent is at {address!r}, not on the bus at "
                                    f"{task_address(task_id)!r}: this Baton only talks to a vm_agent over the bus")
        if expires_at is not None and time.time() >= expires_at:
            raise AgentStartRefused("the workspace's bus credential has expired; the task needs a new workspace")
        subject, data = task_subject(task_id, command), body.model_dump_json().encode()
        timed_out, last_error = False, None
        for backoff_s in (*(0.5 * 2**n for n in range(1, retries)), None):
            try:
                return await self._request(subject, data)
            except nats.errors.TimeoutError as error:  # Subscribed, but no answer: it may have acted.
                timed_out, last_error = True, error
            except nats.errors.Error as error:  # No responder: gone, or not yet reconnected.
                last_error = error
            if backoff_s is not None:
                await asyncio.sleep(backoff_s)
        if timed_out:
            raise VmAgentSilent(f"vm_agent of task {task_id} did not answer {command!r} on the bus in time: "
                                f"it may have taken it") from last_error
        raise AgentStartRefused(f"vm_agent of task {task_id} did not answer on the bus: {last_error}") from last_error

    async def _request(self, subject: str, data: bytes) -> CommandReply:
        reply = await self._nc.request(subject, data, timeout=self._timeout_s)
        return CommandReply.model_validate_json(reply.data)
