"""A minimal, real ACP agent that runs every prompt as a bash script.

Run it as ``python -m vm_agent.agents.shell``. stdout is the ACP channel
(newline-delimited JSON-RPC), so nothing in this module may print: all
diagnostics go to stderr through :mod:`logging`.

One prompt turn:

1. echo the received prompt text back as a ``user_message_chunk`` — Baton's
   proof that the prompt arrived intact (it hashes the echo);
2. run the text with bash in the session's cwd, streaming every output line
   as an ``agent_message_chunk`` whose ``_meta`` is
   ``{"baton.stream": "stdout"}`` or ``{"baton.stream": "stderr"}``; the whole
   lines one read of the pipe brought (N > 1 of them, each ending in a newline)
   go in one chunk marked ``"baton.lines": N``; a line longer than 1 MiB goes in
   pieces, each but its end marked ``"baton.continues": true``;
3. answer ``session/prompt`` with stop reason ``end_turn`` (exit 0),
   ``refusal`` (non-zero exit) or ``cancelled`` (after ``session/cancel``),
   carrying ``_meta = {"exit_code": N}`` (negative N = killed by signal N).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from vm_agent.agents import import_acp_cheaply

import_acp_cheaply()

from acp import (  # noqa: E402 - after the import-time shortcut above
    PROTOCOL_VERSION,
    InitializeResponse,
    NewSessionResponse,
    PromptResponse,
    RequestError,
    run_agent,
    text_block,
)
from acp.interfaces import Client
from acp.schema import (
    AgentCapabilities,
    AgentMessageChunk,
    Implementation,
    TextContentBlock,
    UserMessageChunk,
)

log = logging.getLogger("vm_agent.agents.shell")

STREAM_META_KEY = "baton.stream"
LINES_META_KEY = "baton.lines"
CONTINUES_META_KEY = "baton.continues"
EXIT_CODE_META_KEY = "exit_code"

_READ_CHUNK_BYTES = 64 * 1024
# A runaway line (e.g. minified JSON) is flushed in pieces so memory stays bounded.
_MAX_LINE_BYTES = 1024 * 1024
# Linux caps one argv string (MAX_ARG_STRLEN) at 128 KiB; larger scripts go via a file.
_MAX_INLINE_SCRIPT_BYTES = 100 * 1024
# Background jobs may keep bash's pipes open after bash exits; don't stall the turn on them.
_DRAIN_GRACE_S = 2.0
# Shell convention for "could not run the command at all".
_SPAWN_FAILED_EXIT = 127


@dataclass
class _Session:
    cwd: str
    busy: bool = False
    cancelled: bool = False
    proc: asyncio.subprocess.Process | None = None


class ShellAgent:
    """ACP ``Agent`` implementation: each prompt is a bash script."""

    def __init__(self) -> None:
        self._conn: Client | None = None
        self._sessions: dict[str, _Session] = {}
        self._forwarded = 0  # Lines sent so far: how _drain tells a slow reader from a stuck pipe.

    def on_connect(self, conn: Client) -> None:
        """Keep the client connection so we can push ``session/update``s."""
        self._conn = conn

    async def initialize(self, protocol_version: int, **_: Any) -> InitializeResponse:
        """Advertise the (only) protocol version we speak and no extras."""
        log.info("initialize: client protocol version %s", protocol_version)
        return InitializeResponse(
            protocol_version=PROTOCOL_VERSION,
            agent_capabilities=AgentCapabilities(),
            agent_info=Implementation(name="baton-shell-agent", version="0.1.0"),
        )

    async def new_session(self, cwd: str, **_: Any) -> NewSessionResponse:
        """Create a session that runs its prompts in ``cwd``."""
        session_id = uuid.uuid4().hex
        self._sessions[session_id] = _Session(cwd=cwd)
        log.info("session %s created (cwd=%s)", session_id, cwd)
        return NewSessionResponse(session_id=session_id)

    async def prompt(self, prompt: list[Any], session_id: str, **_: Any) -> PromptResponse:
        """Echo the prompt, run it with bash, report how bash ended."""
        session = self._session(session_id)
        if session.busy:
            raise RequestError.invalid_request({"details": "a prompt is already running in this session"})
        session.busy, session.cancelled = True, False
        try:
            script = _prompt_text(prompt)
            await self._send(session_id, UserMessageChunk(session_update="user_message_chunk", content=text_block(script)))
            exit_code = None if session.cancelled else await self._run_script(session, session_id, script)
            if exit_code is not None and not session.cancelled:
                # Always report how the script ended: even a silent script shows the agent worked.
                await self._forward_text(session_id, "message", f"bash exited with code {exit_code}\n")
        finally:
            session.busy = False
        return _turn_response(exit_code, cancelled=session.cancelled)

    async def cancel(self, session_id: str, **_: Any) -> None:
        """Kill the running script's whole process group; the turn then ends as ``cancelled``."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        session.cancelled = True
        if session.proc is not None:
            log.info("session %s: cancel, killing pid group %s", session_id, session.proc.pid)
            _kill_group(session.proc)

    def kill_all(self) -> None:
        """Kill every running script (agent shutdown must not leave orphans)."""
        for session in self._sessions.values():
            if session.proc is not None:
                _kill_group(session.proc)

    def _session(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise RequestError.invalid_params({"details": f"unknown session {session_id!r}"})
        return session

    async def _send(self, session_id: str, update: UserMessageChunk | AgentMessageChunk) -> None:
        assert self._conn is not None, "on_connect was not called"
        await self._conn.session_update(session_id=session_id, update=update)

    async def _run_script(self, session: _Session, session_id: str, script: str) -> int:
        with _script_argv(script) as argv:
            try:
                proc = await _spawn(argv, session.cwd)
            except OSError as exc:
                await self._forward_text(session_id, "stderr", f"shell agent: cannot start bash: {exc}\n")
                return _SPAWN_FAILED_EXIT
            session.proc = proc
            log.info("session %s: bash pid %s started", session_id, proc.pid)
            try:
                return await self._stream_until_exit(proc, session_id)
            except BaseException:
                _kill_group(proc)  # our turn is being torn down: take the script with us
                raise
            finally:
                session.proc = None

    async def _stream_until_exit(self, proc: asyncio.subprocess.Process, session_id: str) -> int:
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            asyncio.create_task(self._forward_stream(proc.stdout, "stdout", session_id)),
            asyncio.create_task(self._forward_stream(proc.stderr, "stderr", session_id)),
        ]
        try:
            returncode = await proc.wait()
            await _drain(readers, progress=lambda: self._forwarded)
        finally:
            for reader in readers:
                reader.cancel()
        log.info("session %s: bash pid %s exited with %s", session_id, proc.pid, returncode)
        return returncode

    async def _forward_stream(self, reader: asyncio.StreamReader, stream: str, session_id: str) -> None:
        # One reader per stream, awaiting each send: order within a stream is preserved.
        async for lines in _line_runs(reader):
            if len(lines) == 1:
                await self._forward_text(session_id, stream, lines[0],
                                         continues=isinstance(lines[0], LinePiece))
            else:
                await self._forward_lines(session_id, stream, lines)

    async def _forward_text(self, session_id: str, stream: str, text: str, *, continues: bool = False) -> None:
        self._forwarded += 1
        meta: dict[str, Any] = {STREAM_META_KEY: stream}
        if continues:
            meta[CONTINUES_META_KEY] = True
        chunk = AgentMessageChunk(
            session_update="agent_message_chunk",
            content=text_block(text),
            field_meta=meta,
        )
        await self._send(session_id, chunk)

    async def _forward_lines(self, session_id: str, stream: str, lines: list[str]) -> None:
        """Whole lines read together go out in one message, marked with how many lines it holds
        (`_meta["baton.lines"]`): the client records each line as before, without paying a
        message per line on both sides."""
        self._forwarded += len(lines)
        chunk = AgentMessageChunk(
            session_update="agent_message_chunk",
            content=text_block("".join(lines)),
            field_meta={STREAM_META_KEY: stream, LINES_META_KEY: len(lines)},
        )
        await self._send(session_id, chunk)


def _prompt_text(prompt: list[Any]) -> str:
    """The script is the concatenation of the prompt's text blocks."""
    texts = [block.text for block in prompt if isinstance(block, TextContentBlock)]
    if len(texts) != len(prompt):
        log.warning("ignoring %d non-text prompt block(s)", len(prompt) - len(texts))
    return "".join(texts)


def _turn_response(exit_code: int | None, *, cancelled: bool) -> PromptResponse:
    if cancelled:
        stop_reason = "cancelled"
    else:
        stop_reason = "end_turn" if exit_code == 0 else "refusal"
    meta = None if exit_code is None else {EXIT_CODE_META_KEY: exit_code}
    return PromptResponse(stop_reason=stop_reason, field_meta=meta)


@contextlib.contextmanager
def _script_argv(script: str) -> Iterator[list[str]]:
    """argv running ``script`` with bash; stdin stays free (DEVNULL) for the script's commands."""
    if len(script.encode("utf-8")) <= _MAX_INLINE_SCRIPT_BYTES:
        yield ["bash", "-c", script]
        return
    fd, path = tempfile.mkstemp(prefix="baton-shell-", suffix=".sh")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(script)
        yield ["bash", path]
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _spawn(argv: list[str], cwd: str) -> asyncio.subprocess.Process:
    # A new session makes bash the leader of its own process group, so cancel can
    # kill the script and everything it started with one killpg.
    return await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )


async def _drain(readers: list[asyncio.Task[None]], *, progress: Callable[[], int]) -> None:
    """Wait for the output readers to hit EOF; re-raise their failures.

    Bash has exited, but its output may still be in the pipes: wait as long as lines keep
    being forwarded, and give up only on pipes that stay silent for the grace period (a
    background job holding them open), so no line already written is ever dropped.
    """
    while True:
        before = progress()
        done, pending = await asyncio.wait(readers, timeout=_DRAIN_GRACE_S)
        if not pending or progress() == before:
            break
    if pending:
        log.warning("output pipes still open %.1fs after bash exited (background job?)", _DRAIN_GRACE_S)
    for task in done:
        task.result()


async def _lines(reader: asyncio.StreamReader) -> AsyncIterator[str]:
    """Yield decoded lines (newline kept) without the StreamReader line-length limit."""
    async for run in _line_runs(reader):
        for line in run:
            yield line


class LinePiece(str):
    """A piece of a runaway line: the line goes on in the next output of the same stream."""


async def _line_runs(reader: asyncio.StreamReader) -> AsyncIterator[list[str]]:
    """Yield the lines each read completes, as a list (newline kept; a runaway line's pieces, as
    LinePiece, and an unterminated tail come alone, without a newline)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = bytearray()
    while chunk := await reader.read(_READ_CHUNK_BYTES):
        pending += chunk
        *complete, rest = pending.split(b"\n")
        if complete:
            # Decoded whole: a character split across reads is completed by the decoder, and
            # "\n" never occurs inside a UTF-8 sequence, so the text splits back into the lines.
            text = decoder.decode(b"\n".join(complete) + b"\n")
            yield [line + "\n" for line in text[:-1].split("\n")]
        pending = bytearray(rest)
        if len(pending) > _MAX_LINE_BYTES:
            yield [LinePiece(decoder.decode(bytes(pending)))]
            pending.clear()
    tail = decoder.decode(bytes(pending), final=True)
    if tail:
        yield [tail]


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # pgid == pid because bash was started with start_new_session=True.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _serve() -> None:
    agent = ShellAgent()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    # Turn SIGTERM/SIGINT into cancellation so the cleanup below still runs.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, main_task.cancel)
    try:
        # Note: the SDK's receive loop swallows cancellation, so a signal makes
        # run_agent return normally rather than raise CancelledError.
        await run_agent(agent)
    finally:
        agent.kill_all()
        log.info("shell agent exiting")


def main() -> None:
    """Entry point: serve ACP over stdin/stdout until the client hangs up."""
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("BATON_SHELL_AGENT_LOG_LEVEL", "INFO"),
        format="%(asctime)s shell-agent %(levelname)s %(message)s",
    )
    asyncio.run(_serve())


if __name__ == "__main__":
    main()
