"""The vm_agent's HTTP API.

A vm_agent starts unassigned (perhaps ahead of time, with an agent already warm), is assigned
one task's workspace with `POST /assign`, and then `POST /sessions` starts the agent and
delivers the prompt.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from pydantic import BaseModel, Field

from services.runtime.repo_url import RepoCredential
from vm_agent.backends import available_backends, refusal
from vm_agent.permissions import PermissionDesk
from vm_agent.runner import SessionRunner
from vm_agent.state import VmAgent


class RepoCredentialBody(BaseModel):
    host: str
    username: str = Field(repr=False)
    password: str = Field(default="", repr=False)


class Assignment(BaseModel):
    """This vm_agent now serves `task_id` in `workspace`, recording into `state_dir`; `token`
    is what the task runner will present from now on."""

    task_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    workspace: Path
    state_dir: Path
    token: str = Field(min_length=32, repr=False)
    token_expires_at: float = Field(description="Unix time after which `token` is refused")
    nats_credentials: str | None = Field(default=None, repr=False)
    repo_credential: RepoCredentialBody | None = Field(default=None, repr=False)
    """The repo URL's credential, for the push (kept in memory only)."""
    """This workspace's NATS credential (`.creds` text): publishes its task's vm_agent events only."""


class SessionStart(BaseModel):
    """Start `agent` on this workspace with `initial_prompt`; `attempt_id` is the idempotency key."""

    task_id: str
    agent: str
    initial_prompt: str = Field(min_length=1)
    attempt_id: str = Field(min_length=1)
    causation_id: str | None = None
    permission_policy: Literal["auto", "ask"] = "auto"
    """`ask`: a person answers each permission request (`POST /permissions/{request_id}`)."""
    turn: int = Field(default=1, ge=1)
    """The turn `initial_prompt` is: above 1 on a workspace re-provisioned for a follow-up."""
    resume_session_id: str | None = Field(default=None, min_length=1, max_length=200)
    """The task's earlier ACP session: loaded (`session/load`) where the agent can, else a new one
    (AgentSessionStarted says which)."""


class PermissionAnswer(BaseModel):
    """A person's answer to the open permission request of `task_id`."""

    task_id: str
    option_id: str = Field(min_length=1)


class SessionCancel(BaseModel):
    """Stop the agent of `task_id`'s attempt (`agent`: its kind, for a session that never started)."""

    task_id: str
    agent: str


class TurnStart(BaseModel):
    """Run `prompt` as turn `turn` (2, 3, …: the idempotency key) of `task_id`'s agent session."""

    task_id: str
    turn: int = Field(ge=2)
    prompt: str = Field(min_length=1)
    causation_id: str | None = None


TURN_REFUSALS = {
    "busy": "a turn is running; the task runner sends the next one when its push is recorded",
    "out_of_order": "turns run in order: that is not the next one",
    "gone": "the session cannot take a follow-up: its last turn was not pushed or its agent is gone",
}


class SessionAccepted(BaseModel):
    task_id: str
    attempt_id: str
    started_now: bool


ANSWER_REFUSALS = {
    "unknown": (404, "no such permission request"),
    "not_offered": (422, "that option was not offered"),
    "closed": (409, "that permission request was already answered or timed out"),
}


def authorized(request: Request, authorization: Annotated[str, Header()] = "") -> VmAgent:
    vm_agent: VmAgent = request.app.state.vm_agent
    presented = authorization.removeprefix("Bearer ").strip()
    if not hmac.compare_digest(presented, vm_agent.token):
        raise HTTPException(401, "missing or wrong bearer token")
    if vm_agent.token_expired:
        raise HTTPException(401, "this workspace's token has expired; the task needs a new workspace")
    return vm_agent


VmAgentDep = Annotated[VmAgent, Depends(authorized)]


def _repo_credential(body: RepoCredentialBody | None) -> RepoCredential | None:
    return None if body is None else RepoCredential(body.host, body.username, body.password)


def create_app(vm_agent: VmAgent) -> FastAPI:
    app = FastAPI(title="Baton vm_agent")
    app.state.vm_agent = vm_agent
    runners: dict[str, SessionRunner] = {}

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
    async def assign(body: Assignment, vm: VmAgentDep) -> dict:
        if vm.assigned is not None:
            if vm.assigned.task_id != body.task_id:
                raise HTTPException(409, f"this vm_agent already serves task {vm.assigned.task_id}")
            return {"task_id": body.task_id, "assigned_now": False}
        try:
            await vm.assign(body.task_id, body.workspace.resolve(), body.state_dir, body.token,
                            token_expires_at=body.token_expires_at, nats_credentials=body.nats_credentials,
                        repo_credential=_repo_credential(body.repo_credential))
        except ConnectionError as error:  # Unreachable, or the credential refused: say which.
            raise HTTPException(503, f"this vm_agent cannot publish its task's events: {error}") from error
        return {"task_id": body.task_id, "assigned_now": True}

    @app.post("/sessions", status_code=202)
    async def start_session(body: SessionStart, vm: VmAgentDep) -> SessionAccepted:
        if vm.assigned is None or body.task_id != vm.assigned.task_id:
            raise HTTPException(409, f"this vm_agent does not serve task {body.task_id}")
        existing = vm.session()
        if existing is not None:
            if existing.attempt_id != body.attempt_id:
                raise HTTPException(409, f"attempt {existing.attempt_id} already ran here")
            return SessionAccepted(task_id=body.task_id, attempt_id=body.attempt_id, started_now=False)
        backend = available_backends(vm.launcher.agents_dir).get(body.agent)
        if backend is None:
            why = refusal(body.agent, vm.launcher.agents_dir, os.environ)
            raise HTTPException(422, f"agent {body.agent!r} is not available on this machine: {why}")
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
        runners[body.attempt_id] = runner
        return SessionAccepted(task_id=body.task_id, attempt_id=body.attempt_id, started_now=True)

    @app.post("/sessions/{attempt_id}/cancel", status_code=202)
    async def cancel_session(attempt_id: str, body: SessionCancel, vm: VmAgentDep) -> dict:
        """Stop the agent mid-turn (ACP `session/cancel`, a short grace, then its process group is
        ended; AgentFinished `cancelled`, nothing pushed). A session that never started ends at once
        (this vm_agent then exits). 409 once the turn ended by itself (its push follows)."""
        if vm.assigned is None or body.task_id != vm.assigned.task_id:
            raise HTTPException(409, f"this vm_agent does not serve task {body.task_id}")
        existing = vm.session()
        if existing is None:
            vm.open_session(attempt_id, body.agent, None).finished("cancelled", None)
            vm.assigned.store.save(vm.session())
            return {"task_id": body.task_id, "attempt_id": attempt_id, "agent_ran": False}
        runner, run = runners.get(existing.attempt_id), vm.runs.get(existing.attempt_id)
        if existing.attempt_id != attempt_id or runner is None or run is None or not runner.cancel(run):
            raise HTTPException(409, "too late to cancel: the agent's turn already ended")
        return {"task_id": body.task_id, "attempt_id": attempt_id, "agent_ran": True}

    @app.post("/sessions/{attempt_id}/turns", status_code=202)
    async def start_turn(attempt_id: str, body: TurnStart, vm: VmAgentDep) -> dict:
        """A follow-up: the next turn in the same ACP session and agent process, once the turn
        before was pushed; repeating a turn that began starts nothing (409 while another runs)."""
        if vm.assigned is None or body.task_id != vm.assigned.task_id:
            raise HTTPException(409, f"this vm_agent does not serve task {body.task_id}")
        existing, runner = vm.session(), runners.get(attempt_id)
        if existing is None or existing.attempt_id != attempt_id or runner is None:
            raise HTTPException(409, f"no session of attempt {attempt_id} runs here")
        starting = runner.follow_up(body.turn, body.prompt, body.causation_id)
        if starting in TURN_REFUSALS:
            raise HTTPException(409, TURN_REFUSALS[starting])
        return {"task_id": body.task_id, "turn": body.turn, "started_now": starting == "started"}

    @app.post("/permissions/{request_id}")
    async def answer_permission(request_id: str, body: PermissionAnswer, vm: VmAgentDep) -> dict:
        """A person's answer to an open request; repeating the same answer changes nothing."""
        if vm.assigned is None or body.task_id != vm.assigned.task_id:
            raise HTTPException(409, f"this vm_agent does not serve task {body.task_id}")
        if vm.permissions is None:
            raise HTTPException(404, "this task's permission requests are not answered by people")
        answering = vm.permissions.answer(request_id, body.option_id)
        if answering in ANSWER_REFUSALS:
            raise HTTPException(*ANSWER_REFUSALS[answering])
        return {"request_id": request_id, "option_id": body.option_id, "answered_now": answering == "answered"}

    return app
