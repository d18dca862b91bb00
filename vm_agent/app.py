"""The vm_agent's HTTP API, for a person debugging one machine (`--debug-http-port`, 127.0.0.1 only).

The control plane never calls it: it talks to a vm_agent over the bus (vm_agent/commands.py).
`/health` says how the vm_agent is; each acting route runs the same command as the bus does
(`VmAgentCommands`, one implementation), behind the bearer token the vm_agent was started with (BATON_VM_AGENT_TOKEN).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from pydantic import BaseModel, ValidationError

from services.runtime.vm_agent_commands import (
    Assignment, CommandReply, PermissionAnswer, SessionCancel, SessionStart, TurnStart,
)
from vm_agent.commands import VmAgentCommands
from vm_agent.state import VmAgent


def authorized(request: Request, authorization: Annotated[str, Header()] = "") -> VmAgent:
    vm_agent: VmAgent = request.app.state.vm_agent
    presented = authorization.removeprefix("Bearer ").strip()
    if not vm_agent.debug_token or not hmac.compare_digest(presented, vm_agent.debug_token):
        raise HTTPException(401, "missing or wrong bearer token")
    if vm_agent.credential_expired:
        raise HTTPException(401, "this workspace's bus credential has expired; the task needs a new workspace")
    return vm_agent


VmAgentDep = Annotated[VmAgent, Depends(authorized)]


async def _run(command: Callable[..., Awaitable[CommandReply]], body_type: type[BaseModel], body: dict) -> dict:
    """The command's result, or its refusal as the HTTP status it names."""
    try:
        parsed = body_type.model_validate(body)
    except ValidationError as error:
        fields = sorted({".".join(map(str, e["loc"])) or "body" for e in error.errors()})
        raise HTTPException(422, f"not valid: {', '.join(fields)}") from None
    reply = await command(parsed)
    if not reply.accepted:
        raise HTTPException(reply.status, reply.reason)
    return reply.result


def create_app(vm_agent: VmAgent, commands: VmAgentCommands | None = None) -> FastAPI:
    app = FastAPI(title="Baton vm_agent (debugging)")
    app.state.vm_agent = vm_agent
    commands = commands or VmAgentCommands(vm_agent)

    @app.get("/health")
    def health() -> dict:
        session = vm_agent.session() if vm_agent.assigned else None
        return {
            "status": "ok",
            "task_id": vm_agent.assigned.task_id if vm_agent.assigned else None,
            "warm_agent": vm_agent.warm_backend,
            "warm_agent_state": vm_agent.warm_agent_state,
            "session_ended": bool(session and session.ended),
        }

    @app.post("/assign")
    async def assign(body: dict, vm: VmAgentDep) -> dict:
        return await _run(commands.assign, Assignment, body)

    @app.post("/sessions", status_code=202)
    async def start_session(body: dict, vm: VmAgentDep) -> dict:
        return await _run(commands.start_session, SessionStart, body)

    @app.post("/sessions/{attempt_id}/cancel", status_code=202)
    async def cancel_session(attempt_id: str, body: dict, vm: VmAgentDep) -> dict:
        return await _run(commands.cancel_session, SessionCancel, {**body, "attempt_id": attempt_id})

    @app.post("/sessions/{attempt_id}/turns", status_code=202)
    async def start_turn(attempt_id: str, body: dict, vm: VmAgentDep) -> dict:
        return await _run(commands.start_turn, TurnStart, {**body, "attempt_id": attempt_id})

    @app.post("/permissions/{request_id}")
    async def answer_permission(request_id: str, body: dict, vm: VmAgentDep) -> dict:
        return await _run(commands.answer_permission, PermissionAnswer, {**body, "request_id": request_id})

    return app
