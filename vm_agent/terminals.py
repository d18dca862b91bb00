"""The agent's ACP `terminal/*`: commands it asks the client to run, run inside its own sandbox.

Each command is started the way the agent was (`Sandbox.launch` over the same workspace and home,
the same environment), so a terminal can do no more than the agent itself: it cannot read the data
dir. The variables the agent asks for are set inside the sandbox (`env NAME=VALUE`), never on the
sandbox's own launcher. Output (stdout and stderr merged) is kept up to a byte limit, its start
dropped first, as ACP says.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from vm_agent.sandbox import AgentLaunch

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 1024 * 1024
"""The most output kept per terminal, whatever the agent asks for."""
_READ_CHUNK = 64 * 1024
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

LaunchCommand = Callable[[Sequence[str]], AgentLaunch]
"""How a command starts in the agent's sandbox (its argv as the agent would run it)."""


class UnknownTerminal(Exception):
    """No terminal of that id (never created, or released)."""


@dataclass(frozen=True)
class ExitStatus:
    exit_code: int | None
    signal: str | None


class Terminal:
    """One command's process and the tail of its output."""

    def __init__(self, proc: asyncio.subprocess.Process, limit: int) -> None:
        self.proc = proc
        self.limit = limit
        self.truncated = False
        self._output = bytearray()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(_READ_CHUNK):
            self._output += chunk
            if len(self._output) > self.limit:
                del self._output[: len(self._output) - self.limit]
                self.truncated = True

    def output(self) -> str:
        """The output kept so far (a character cut by the limit is dropped whole)."""
        data = bytes(self._output)
        if self.truncated:
            data = data.lstrip(bytes(range(0x80, 0xC0)))  # Continuation bytes of a cut character.
        return data.decode("utf-8", errors="replace")

    def exit_status(self) -> ExitStatus | None:
        code = self.proc.returncode
        if code is None:
            return None
        if code < 0:
            return ExitStatus(None, signal.Signals(-code).name)
        return ExitStatus(code, None)

    async def wait(self) -> ExitStatus:
        await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._reader), 2.0)
        status = self.exit_status()
        assert status is not None
        return status

    def kill(self) -> None:
        """Kill the command and whatever it started (its process group)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)


class Terminals:
    """The terminals of one agent run; `close` kills every one still running."""

    def __init__(self, launch: LaunchCommand, *, workspace_view: PurePosixPath) -> None:
        self._launch = launch
        self._view = workspace_view
        self._terminals: dict[str, Terminal] = {}
        self._ids = itertools.count(1)

    async def create(
        self, command: str, args: Sequence[str], *, env: Mapping[str, str], cwd: str | None,
        output_byte_limit: int | None,
    ) -> str:
        """Start `command` (with `args`, else as a shell command line) in the sandbox; its id."""
        launch = self._launch(self._inner_argv(command, args, env, cwd))
        proc = await asyncio.create_subprocess_exec(
            *launch.argv, cwd=str(launch.cwd), env=launch.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        limit = min(output_byte_limit or MAX_OUTPUT_BYTES, MAX_OUTPUT_BYTES)
        terminal_id = f"term-{next(self._ids)}"
        self._terminals[terminal_id] = Terminal(proc, limit)
        log.info("terminal %s: pid %s runs %r", terminal_id, proc.pid, [command, *args])
        return terminal_id

    def get(self, terminal_id: str) -> Terminal:
        try:
            return self._terminals[terminal_id]
        except KeyError:
            raise UnknownTerminal(terminal_id) from None

    def output_of(self, terminal_id: str) -> str | None:
        """The output of `terminal_id` so far, or None if there is no such terminal."""
        terminal = self._terminals.get(terminal_id)
        return terminal.output() if terminal is not None else None

    def release(self, terminal_id: str) -> None:
        self.get(terminal_id).kill()
        del self._terminals[terminal_id]

    def close(self) -> None:
        for terminal in self._terminals.values():
            terminal.kill()
        self._terminals.clear()

    def _inner_argv(self, command: str, args: Sequence[str], env: Mapping[str, str], cwd: str | None) -> list[str]:
        """What runs inside the sandbox: `env` to set the directory and variables, then the command."""
        directory = self._directory(cwd)
        assignments = [f"{name}={value}" for name, value in env.items() if _ENV_NAME.fullmatch(name)]
        program = [command, *args] if args else ["/bin/sh", "-c", command]
        return ["env", "-C", str(directory), "--", *assignments, *program]

    def _directory(self, cwd: str | None) -> PurePosixPath:
        """The command's directory as the agent names it (a relative one inside its workspace);
        the sandbox, not this, confines where it can go."""
        return self._view / cwd if cwd else self._view
