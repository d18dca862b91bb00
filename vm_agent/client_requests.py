"""What an ACP agent may ask of its client during a run: its workspace's files, terminals in its
sandbox, and permissions, answered by the task's permission policy (`auto`, or a person: `ask`).

Every refusal is an ACP error (`RequestError`) whose message says why, so the agent (and whoever
reads its transcript) sees it; nothing here lets the agent reach past its workspace and sandbox.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

from acp import RequestError
from acp.schema import (
    AllowedOutcome,
    CreateTerminalResponse,
    DeniedOutcome,
    EnvVariable,
    KillTerminalResponse,
    PermissionOption,
    ReadTextFileResponse,
    ReleaseTerminalResponse,
    RequestPermissionResponse,
    TerminalExitStatus,
    TerminalOutputResponse,
    WaitForTerminalExitResponse,
    WriteTextFileResponse,
)

from events import PermissionAnswered
from vm_agent.domain import TurnEvent
from vm_agent.permissions import PermissionDesk
from vm_agent.terminals import Terminals, UnknownTerminal
from vm_agent.turn_events import permission_requested
from vm_agent.workspace_files import OutsideWorkspace, WorkspaceFiles

log = logging.getLogger(__name__)

AUTO_POLICY = "policy:auto"


def choose_allow_once(options: Sequence[PermissionOption]) -> PermissionOption | None:
    """The `auto` policy: allow this once. Never `allow_always` (Gemini CLI fails on it in an
    untrusted folder, and a standing grant outlives what the task's policy decided)."""
    return next((option for option in options if option.kind == "allow_once"), None)


def choose_reject(options: Sequence[PermissionOption]) -> PermissionOption | None:
    """What a request nobody answered gets: rejected once (else the request is cancelled)."""
    return next((option for option in options if option.kind == "reject_once"), None)


class ClientRequests:
    """Serves one agent run's requests; `record` puts an event in the turn's ordered stream."""

    def __init__(self, files: WorkspaceFiles, terminals: Terminals | None, record: Callable[[TurnEvent], None],
                 permissions: PermissionDesk | None = None) -> None:
        self.files = files
        self.terminals = terminals
        self._record = record
        self._permissions = permissions
        """None: the `auto` policy; else the `ask` policy, a person answers through this desk."""
        self._permission_ids = itertools.count(1)

    async def read_text_file(self, path: str, line: int | None = None, limit: int | None = None) -> ReadTextFileResponse:
        try:
            return ReadTextFileResponse(content=self.files.read_text(path, line=line, limit=limit))
        except OutsideWorkspace as refused:
            raise RequestError.invalid_params({"path": path, "reason": str(refused)}) from None
        except FileNotFoundError:
            raise RequestError.resource_not_found(path) from None
        except OSError as error:
            raise RequestError.internal_error({"path": path, "reason": str(error)}) from None

    async def write_text_file(self, path: str, content: str) -> WriteTextFileResponse:
        try:
            self.files.write_text(path, content)
        except OutsideWorkspace as refused:
            raise RequestError.invalid_params({"path": path, "reason": str(refused)}) from None
        except OSError as error:
            raise RequestError.internal_error({"path": path, "reason": str(error)}) from None
        return WriteTextFileResponse()

    async def request_permission(self, tool_call: Any, options: list[PermissionOption]) -> RequestPermissionResponse:
        """Answered by the task's policy (`auto`, or a person under `ask`); the request and its
        answer are both recorded."""
        request_id = str(next(self._permission_ids))
        if self._permissions is not None:
            return await self._ask_a_person(request_id, tool_call, options)
        self._record(permission_requested(request_id, tool_call, options))
        choice = choose_allow_once(options)
        if choice is None:
            log.warning("permission %s: no allow_once option offered, declining", request_id)
            self._record(PermissionAnswered(request_id=request_id, option_id=None, outcome="cancelled", by=AUTO_POLICY))
            return RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))
        self._record(PermissionAnswered(request_id=request_id, option_id=choice.option_id, outcome="selected",
                                        by=AUTO_POLICY))
        return RequestPermissionResponse(outcome=AllowedOutcome(outcome="selected", option_id=choice.option_id))

    async def _ask_a_person(self, request_id: str, tool_call: Any,
                            options: list[PermissionOption]) -> RequestPermissionResponse:
        """Wait (on a future, never blocking the loop) for a person's answer or the timeout."""
        assert self._permissions is not None
        self._permissions.open(request_id, [option.option_id for option in options])
        self._record(permission_requested(request_id, tool_call, options))
        reject = choose_reject(options)
        decision = await self._permissions.decision(request_id, reject_option=reject.option_id if reject else None)
        outcome = "selected" if decision.option_id is not None else "cancelled"
        self._record(PermissionAnswered(request_id=request_id, option_id=decision.option_id, outcome=outcome,
                                        by=decision.by, reason=decision.reason))
        if decision.option_id is None:
            return RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))
        return RequestPermissionResponse(outcome=AllowedOutcome(outcome="selected", option_id=decision.option_id))

    async def create_terminal(
        self, command: str, args: list[str] | None = None, env: list[EnvVariable] | None = None,
        cwd: str | None = None, output_byte_limit: int | None = None,
    ) -> CreateTerminalResponse:
        terminals = self._terminals()
        try:
            terminal_id = await terminals.create(
                command, args or [], env={v.name: v.value for v in env or []}, cwd=cwd,
                output_byte_limit=output_byte_limit)
        except OSError as error:
            raise RequestError.internal_error({"command": command, "reason": str(error)}) from None
        return CreateTerminalResponse(terminal_id=terminal_id)

    async def terminal_output(self, terminal_id: str) -> TerminalOutputResponse:
        terminal = self._terminal(terminal_id)
        status = terminal.exit_status()
        return TerminalOutputResponse(
            output=terminal.output(), truncated=terminal.truncated,
            exit_status=TerminalExitStatus(exit_code=status.exit_code, signal=status.signal) if status else None)

    async def wait_for_terminal_exit(self, terminal_id: str) -> WaitForTerminalExitResponse:
        status = await self._terminal(terminal_id).wait()
        return WaitForTerminalExitResponse(exit_code=status.exit_code, signal=status.signal)

    async def kill_terminal(self, terminal_id: str) -> KillTerminalResponse:
        self._terminal(terminal_id).kill()
        return KillTerminalResponse()

    async def release_terminal(self, terminal_id: str) -> ReleaseTerminalResponse:
        try:
            self._terminals().release(terminal_id)
        except UnknownTerminal:
            raise RequestError.invalid_params({"terminalId": terminal_id, "reason": "no such terminal"}) from None
        return ReleaseTerminalResponse()

    def terminal_output_text(self, terminal_id: str) -> str | None:
        """A terminal's output so far (for a tool call that shows it), None if unknown."""
        return self.terminals.output_of(terminal_id) if self.terminals is not None else None

    def close(self) -> None:
        """Kill every terminal still running."""
        if self.terminals is not None:
            self.terminals.close()

    def _terminals(self) -> Terminals:
        if self.terminals is None:
            raise RequestError.method_not_found("terminal/create")
        return self.terminals

    def _terminal(self, terminal_id: str) -> Any:
        try:
            return self._terminals().get(terminal_id)
        except UnknownTerminal:
            raise RequestError.invalid_params({"terminalId": terminal_id, "reason": "no such terminal"}) from None
