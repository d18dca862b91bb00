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

It speaks ACP's JSON-RPC itself (`JsonRpcPeer`) rather than through the ACP SDK: the agent starts
once per task, and importing the SDK (its ~280 pydantic models) was 90 % of a warm pool member's
CPU (0.27 of 0.3 s, docs/benchmarks.md, issue 17). The SDK stays on the other end: the vm_agent's
client validates every message this agent sends (tests/integration/test_acp_shell_agent.py drives
it through the SDK's own client).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("vm_agent.agents.shell")

STREAM_META_KEY = "baton.stream"
LINES_META_KEY = "baton.lines"
CONTINUES_META_KEY = "baton.continues"
EXIT_CODE_META_KEY = "exit_code"

PROTOCOL_VERSION = 1
"""The ACP version this agent speaks (the SDK's `acp.PROTOCOL_VERSION`)."""

_READ_CHUNK_BYTES = 64 * 1024
# One JSON-RPC line may carry a whole prompt (a script of any size).
_STDIO_LIMIT_BYTES = 64 * 1024 * 1024
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


class RequestError(Exception):
    """A JSON-RPC error answer (codes as JSON-RPC 2.0 defines them)."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.data = code, message, data

    def as_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **({"data": self.data} if self.data else {})}


def _invalid_request(details: str) -> RequestError:
    return RequestError(-32600, "Invalid request", {"details": details})


def _invalid_params(details: str) -> RequestError:
    return RequestError(-32602, "Invalid params", {"details": details})


class JsonRpcPeer:
    """ACP's transport, as far as this agent needs it: newline-delimited JSON-RPC 2.0 on
    stdin/stdout. Each request is answered from a task of its own, so `session/cancel` is read
    while a prompt runs; every line is written whole, in the order it was sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._requests: set[asyncio.Task[None]] = set()

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        await self._send({"jsonrpc": "2.0", "method": method, "params": params})

    async def serve(self, agent: ShellAgent) -> None:
        """Until stdin closes: dispatch each message to `agent`."""
        while line := await self._reader.readline():
            try:
                message = json.loads(line)
            except ValueError:
                await self._send({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}})
                continue
            if not isinstance(message, dict) or "method" not in message:
                continue  # A response: this agent asks the client nothing.
            if "id" not in message:  # A notification.
                if message["method"] == "session/cancel":
                    await agent.cancel(**_params(message))
                continue
            task = asyncio.create_task(self._answer(agent, message))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)

    async def _answer(self, agent: ShellAgent, request: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"]}
        handler = agent.methods().get(request["method"])
        try:
            if handler is None:
                raise RequestError(-32601, "Method not found", {"method": request["method"]})
            reply["result"] = await handler(**_params(request))
        except RequestError as error:
            reply["error"] = error.as_error()
        except TypeError as error:  # Missing or unexpected params.
            reply["error"] = _invalid_params(str(error)).as_error()
        await self._send(reply)

    async def _send(self, message: dict[str, Any]) -> None:
        self._writer.write(json.dumps(message, ensure_ascii=False).encode() + b"\n")
        await self._writer.drain()

    def stop(self) -> None:
        for task in self._requests:
            task.cancel()


def _params(message: dict[str, Any]) -> dict[str, Any]:
    """The params, under this module's names (`sessionId` → `session_id`)."""
    params = message.get("params") or {}
    return {_snake(key): value for key, value in params.items()} if isinstance(params, dict) else {}


def _snake(name: str) -> str:
    """`sessionId` → `session_id`; `_meta` → `meta`."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name.lstrip("_"))


class ShellAgent:
    """ACP agent: each prompt is a bash script."""

    def __init__(self, peer: JsonRpcPeer | None = None) -> None:
        self._peer = peer
        self._sessions: dict[str, _Session] = {}
        self._forwarded = 0  # Lines sent so far: how _drain tells a slow reader from a stuck pipe.

    def methods(self) -> dict[str, Callable[..., Any]]:
        """The ACP requests it answers, by method name."""
        return {"initialize": self.initialize, "session/new": self.new_session, "session/prompt": self.prompt}

    async def initialize(self, protocol_version: int, **_: Any) -> dict[str, Any]:
        """Advertise the (only) protocol version we speak and no extras."""
        log.info("initialize: client protocol version %s", protocol_version)
        return {"protocolVersion": PROTOCOL_VERSION, "agentCapabilities": {}, "authMethods": [],
                "agentInfo": {"name": "baton-shell-agent", "version": "0.1.0"}}

    async def new_session(self, cwd: str, **_: Any) -> dict[str, Any]:
        """Create a session that runs its prompts in ``cwd``."""
        session_id = uuid.uuid4().hex
        self._sessions[session_id] = _Session(cwd=cwd)
        log.info("session %s created (cwd=%s)", session_id, cwd)
        return {"sessionId": session_id}

    async def prompt(self, prompt: list[Any], session_id: str, **_: Any) -> dict[str, Any]:
        """Echo the prompt, run it with bash, report how bash ended."""
        session = self._session(session_id)
        if session.busy:
            raise _invalid_request("a prompt is already running in this session")
        session.busy, session.cancelled = True, False
        try:
            script = _prompt_text(prompt)
            await self._send(session_id, {"sessionUpdate": "user_message_chunk", "content": _text(script)})
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
            raise _invalid_params(f"unknown session {session_id!r}")
        return session

    async def _send(self, session_id: str, update: dict[str, Any]) -> None:
        assert self._peer is not None, "no peer to send to"
        await self._peer.notify("session/update", {"sessionId": session_id, "update": update})

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
        await self._send(session_id, {"sessionUpdate": "agent_message_chunk", "content": _text(text), "_meta": meta})

    async def _forward_lines(self, session_id: str, stream: str, lines: list[str]) -> None:
        """Whole lines read together go out in one message, marked with how many lines it holds
        (`_meta["baton.lines"]`): the client records each line as before, without paying a
        message per line on both sides."""
        self._forwarded += len(lines)
        await self._send(session_id, {"sessionUpdate": "agent_message_chunk", "content": _text("".join(lines)),
                                      "_meta": {STREAM_META_KEY: stream, LINES_META_KEY: len(lines)}})


def _text(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def _prompt_text(prompt: list[Any]) -> str:
    """The script is the concatenation of the prompt's text blocks."""
    texts = [block["text"] for block in prompt
             if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)]
    if len(texts) != len(prompt):
        log.warning("ignoring %d non-text prompt block(s)", len(prompt) - len(texts))
    return "".join(texts)


def _turn_response(exit_code: int | None, *, cancelled: bool) -> dict[str, Any]:
    if cancelled:
        stop_reason = "cancelled"
    else:
        stop_reason = "end_turn" if exit_code == 0 else "refusal"
    return {"stopReason": stop_reason, **({} if exit_code is None else {"_meta": {EXIT_CODE_META_KEY: exit_code}})}


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


async def _stdio() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_STDIO_LIMIT_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout)
    return reader, asyncio.StreamWriter(transport, protocol, None, loop)


async def _serve() -> None:
    peer = JsonRpcPeer(*await _stdio())
    agent = ShellAgent(peer)
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    # Turn SIGTERM/SIGINT into cancellation so the cleanup below still runs.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, main_task.cancel)
    try:
        await peer.serve(agent)
    except asyncio.CancelledError:
        pass
    finally:
        peer.stop()
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
