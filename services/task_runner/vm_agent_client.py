"""The HTTP client the task runner uses to start an agent in a workspace."""

from __future__ import annotations

import asyncio
from typing import Protocol

import httpx

from services.runtime.tokens import vm_agent_token


class AgentStartRefused(Exception):
    """The vm_agent could not be reached or refused to start the agent; str() says why."""


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
    """`POST /sessions` on a workspace's vm_agent: starts the agent and delivers the prompt.

    The attempt id is the idempotency key: repeating the call never starts a second agent.
    """

    def __init__(self, secret: str, *, attempts: int = 4, timeout_s: float = 10.0) -> None:
        self._secret = secret
        self._attempts = attempts
        self._http = httpx.AsyncClient(timeout=timeout_s)

    async def start_agent_with_prompt(
        self, vm_agent_url: str, *, task_id: str, agent: str, prompt: str, attempt_id: str,
        causation_id: str, token_expires_at: float | None = None, permission_policy: str = "auto",
        turn: int = 1, resume_session_id: str | None = None,
    ) -> None:
        body = {
            "task_id": task_id, "agent": agent, "initial_prompt": prompt,
            "attempt_id": attempt_id, "causation_id": causation_id, "permission_policy": permission_policy,
            "turn": turn, "resume_session_id": resume_session_id,
        }
        headers = {"Authorization": f"Bearer {vm_agent_token(self._secret, task_id, token_expires_at)}"}
        for attempt in range(1, self._attempts + 1):
            try:
                response = await self._http.post(f"{vm_agent_url}/sessions", json=body, headers=headers)
            except httpx.TransportError as error:
                if attempt == self._attempts:
                    raise AgentStartRefused(f"vm_agent at {vm_agent_url} unreachable: {error!r}") from error
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            if response.status_code == 202:
                return
            raise AgentStartRefused(
                f"vm_agent refused to start the agent ({response.status_code}): {response.text[:500]}"
            )

    async def answer_permission(
        self, vm_agent_url: str, *, task_id: str, request_id: str, option_id: str,
        token_expires_at: float | None = None,
    ) -> None:
        """`POST /permissions/{request_id}`: hand a person's answer to the waiting agent (idempotent
        per request); raises AgentStartRefused saying why it was not taken."""
        headers = {"Authorization": f"Bearer {vm_agent_token(self._secret, task_id, token_expires_at)}"}
        body = {"task_id": task_id, "option_id": option_id}
        try:
            response = await self._http.post(f"{vm_agent_url}/permissions/{request_id}", json=body, headers=headers)
        except httpx.TransportError as error:
            raise AgentStartRefused(f"vm_agent at {vm_agent_url} unreachable: {error!r}") from error
        if response.status_code != 200:
            raise AgentStartRefused(f"vm_agent refused the answer ({response.status_code}): {response.text[:500]}")

    async def cancel_session(
        self, vm_agent_url: str, *, task_id: str, attempt_id: str, agent: str,
        token_expires_at: float | None = None,
    ) -> bool:
        """`POST /sessions/{attempt_id}/cancel`: True once the vm_agent is stopping the agent (it
        records AgentFinished `cancelled`), False if the turn had already ended (too late to stop
        the push); raises AgentStartRefused when the vm_agent cannot be reached or refuses."""
        headers = {"Authorization": f"Bearer {vm_agent_token(self._secret, task_id, token_expires_at)}"}
        body = {"task_id": task_id, "agent": agent}
        try:
            response = await self._http.post(f"{vm_agent_url}/sessions/{attempt_id}/cancel", json=body,
                                             headers=headers)
        except httpx.TransportError as error:
            raise AgentStartRefused(f"vm_agent at {vm_agent_url} unreachable: {error!r}") from error
        if response.status_code == 202:
            return True
        if response.status_code == 409:
            return False
        raise AgentStartRefused(f"vm_agent refused the cancel ({response.status_code}): {response.text[:500]}")

    async def start_turn(
        self, vm_agent_url: str, *, task_id: str, attempt_id: str, turn: int, prompt: str,
        causation_id: str, token_expires_at: float | None = None,
    ) -> None:
        """`POST /sessions/{attempt_id}/turns`: run a follow-up as turn `turn` (the idempotency key:
        a turn that began is not started again); raises AgentStartRefused saying why not."""
        headers = {"Authorization": f"Bearer {vm_agent_token(self._secret, task_id, token_expires_at)}"}
        body = {"task_id": task_id, "turn": turn, "prompt": prompt, "causation_id": causation_id}
        try:
            response = await self._http.post(f"{vm_agent_url}/sessions/{attempt_id}/turns", json=body,
                                             headers=headers)
        except httpx.TransportError as error:
            raise AgentStartRefused(f"vm_agent at {vm_agent_url} unreachable: {error!r}") from error
        if response.status_code != 202:
            raise AgentStartRefused(f"vm_agent refused turn {turn} ({response.status_code}): {response.text[:500]}")

    async def aclose(self) -> None:
        await self._http.aclose()
