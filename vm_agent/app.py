"""The vm_agent's HTTP API: `POST /sessions` starts the agent and delivers the prompt."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from pydantic import BaseModel, Field

from services.runtime.store import ServiceStore
from vm_agent.backends import available_backends
from vm_agent.domain import Session
from vm_agent.runner import SessionRunner


class SessionStart(BaseModel):
    """Start `agent` on this workspace with `initial_prompt`; `attempt_id` is the idempotency key."""

    task_id: str
    agent: str
    initial_prompt: str = Field(min_length=1)
    attempt_id: str = Field(min_length=1)
    causation_id: str | None = None


class SessionAccepted(BaseModel):
    task_id: str
    attempt_id: str
    started_now: bool


@dataclass
class VmAgent:
    task_id: str
    workspace: Path
    token: str
    store: ServiceStore
    faults: frozenset[str]
    runs: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def session(self) -> Session | None:
        return self.store.get_task_aggregate(Session, self.task_id)


def get_vm_agent(request: Request, authorization: Annotated[str, Header()] = "") -> VmAgent:
    vm_agent: VmAgent = request.app.state.vm_agent
    presented = authorization.removeprefix("Bearer ").strip()
    if not hmac.compare_digest(presented, vm_agent.token):
        raise HTTPException(401, "missing or wrong bearer token")
    return vm_agent


VmAgentDep = Annotated[VmAgent, Depends(get_vm_agent)]


def create_app(vm_agent: VmAgent) -> FastAPI:
    app = FastAPI(title="Baton vm_agent")
    app.state.vm_agent = vm_agent

    @app.get("/health")
    def health() -> dict:
        session = vm_agent.session()
        return {"status": "ok", "task_id": vm_agent.task_id, "session_ended": bool(session and session.ended)}

    @app.post("/sessions", status_code=202)
    async def start_session(body: SessionStart, vm: VmAgentDep) -> SessionAccepted:
        if body.task_id != vm.task_id:
            raise HTTPException(409, f"this vm_agent serves task {vm.task_id}, not {body.task_id}")
        existing = vm.session()
        if existing is not None:
            if existing.attempt_id != body.attempt_id:
                raise HTTPException(409, f"attempt {existing.attempt_id} already ran here")
            return SessionAccepted(task_id=vm.task_id, attempt_id=body.attempt_id, started_now=False)
        backend = available_backends().get(body.agent)
        if backend is None:
            raise HTTPException(422, f"agent {body.agent!r} is not available on this machine")
        session = Session(vm.task_id, body.attempt_id, body.agent, body.causation_id)
        vm.store.save(session)
        runner = SessionRunner(
            vm.store, session, workspace=vm.workspace, backend=backend,
            prompt=body.initial_prompt, faults=vm.faults,
        )
        vm.runs[body.attempt_id] = asyncio.get_running_loop().create_task(runner.run())
        return SessionAccepted(task_id=vm.task_id, attempt_id=body.attempt_id, started_now=True)

    return app
