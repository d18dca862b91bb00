"""Client side of one ACP agent run: spawn, handshake, one prompt turn, teardown.

:func:`start_agent_with_prompt` owns the whole life of an agent subprocess
and reports progress to a :class:`SessionSink`. All sink calls for a turn are
made from a single task, in the order the agent sent its updates, so the sink
never sees output before ``prompt_delivered`` or out of order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

from acp import (
    PROTOCOL_VERSION,
    RequestError,
    connect_to_agent,
    default_environment,
    text_block,
)
from acp.client.connection import ClientSideConnection
from acp.schema import (
    AgentMessageChunk,
    AgentPlanUpdate,
    AgentThoughtChunk,
    AllowedOutcome,
    ClientCapabilities,
    DeniedOutcome,
    FileSystemCapabilities,
    Implementation,
    PermissionOption,
    RequestPermissionResponse,
    TextContentBlock,
    ToolCallProgress,
    ToolCallStart,
    UserMessageChunk,
)

from vm_agent.domain import TurnEvent

log = logging.getLogger(__name__)

__all__ = ["AgentProcess", "AgentStartError", "SessionSink", "TurnResult", "start_agent_with_prompt"]

STREAM_META_KEY = "baton.stream"
LINES_META_KEY = "baton.lines"
CONTINUES_META_KEY = "baton.continues"
EXIT_CODE_META_KEY = "exit_code"

# The SDK's asyncio default (64 KiB) is too small for big tool outputs; the SDK's
# own agent side uses 50 MiB. (Its reader also copes with longer lines, just slower.)
STDIO_LIMIT_BYTES = 50 * 1024 * 1024
# initialize + session/new must finish within this, or the agent counts as not started.
HANDSHAKE_TIMEOUT_S = 120.0
# After session/cancel, how long the agent gets to end the turn before we tear it down.
CANCEL_GRACE_S = 2.0
# Shutdown ladder: stdin EOF -> wait -> SIGTERM group -> wait -> SIGKILL group.
SHUTDOWN_GRACE_S = 2.0
_STDERR_TAIL_LINES = 40

# Updates that only exist because a prompt turn is running. Session metadata
# (available commands, modes, usage...) may arrive unprompted, right after
# session/new, so it must not count as proof that the prompt arrived.
_TURN_UPDATES = (UserMessageChunk, AgentMessageChunk, AgentThoughtChunk, ToolCallStart, ToolCallProgress, AgentPlanUpdate)
_AGENT_STREAMS = frozenset({"stdout", "stderr"})


class SessionSink(Protocol):
    """Receives the progress of one agent run."""

    async def agent_started(self, session_id: str) -> None:
        """initialize + session/new succeeded; ``session_id`` is the agent's."""

    async def prompt_delivered(self, prompt_sha256: str) -> None:
        """The agent accepted the prompt (called once, before any ``output``)."""

    async def output(self, stream: str, text: str, *, continues: bool = False) -> None:
        """Agent output; ``stream`` is one of "stdout", "stderr", "message", "thought";
        ``continues``: the next output of this stream continues this line."""

    async def report(self, event: TurnEvent) -> None:
        """A tool call, plan, usage or permission event of the turn, in order with the output."""


@dataclass(frozen=True)
class TurnResult:
    """How the prompt turn ended."""

    stop_reason: str
    exit_code: int | None  # PromptResponse ``_meta["exit_code"]`` when the agent reports one


class AgentStartError(Exception):
    """The agent could not be spawned or initialized (message includes its stderr tail)."""


class AgentProcess:
    """An ACP agent subprocess, spawned and initialized, ready for one prompt run.

    Starting an agent (a Python SDK import alone can take most of a second) is the slow
    part of a run; a vm_agent can start one ahead of time and hand it a run later.
    """

    def __init__(self, command: Sequence[str]) -> None:
        self.command = list(command)
        self._events = _AgentEvents()
        self._stack = contextlib.AsyncExitStack()
        self._conn: ClientSideConnection | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr_tail: _StderrTail | None = None
        self.session_cwd: Path | None = None

    @classmethod
    async def start(
        cls, command: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None,
        session_cwd: Path | None = None,
    ) -> AgentProcess:
        """Spawn `command` in `cwd` and run ACP initialize; raises AgentStartError.

        `session_cwd`: the workspace as the agent sees it (in a sandbox, not the host's path);
        its session opens there whatever `run_prompt` is told."""
        agent = cls(command)
        agent.session_cwd = session_cwd
        connection = _agent_connection(command, Path(cwd).resolve(), env, agent._events)
        agent._conn, agent._proc, agent._stderr_tail = await agent._stack.enter_async_context(connection)
        try:
            await _initialize(agent._conn, agent._proc, agent._stderr_tail)
        except BaseException:
            await agent.close()
            raise
        return agent

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def run_prompt(
        self, *, cwd: Path, prompt: str, sink: SessionSink, deliver_prompt: bool = True
    ) -> TurnResult:
        """Open a session in `cwd` and play one prompt turn (see start_agent_with_prompt)."""
        assert self._conn and self._proc and self._stderr_tail, "start() first"
        self._events.attach(sink, prompt)
        workspace = self.session_cwd or Path(cwd).resolve()
        session_id = await _new_session(self._conn, workspace, self._proc, self._stderr_tail)
        await sink.agent_started(session_id)
        if not deliver_prompt:
            await _withhold_prompt(self._proc, self._stderr_tail)
        try:
            return await _run_turn(self._conn, session_id, prompt, self._events)
        except ConnectionError as exc:
            await self._stderr_tail.settle(self._proc)
            failure = _describe_failure("agent connection lost mid-turn", exc, self._proc, self._stderr_tail)
            raise ConnectionError(failure) from exc

    async def close(self) -> None:
        """Tear the agent and its whole process group down."""
        await self._stack.aclose()


async def start_agent_with_prompt(
    command: Sequence[str],
    *,
    cwd: Path,
    prompt: str,
    sink: SessionSink,
    env: Mapping[str, str] | None = None,
    deliver_prompt: bool = True,
    agent: AgentProcess | None = None,
) -> TurnResult:
    """Run ``command`` as an ACP agent in ``cwd`` and play one prompt turn.

    ``agent`` is one already started (AgentProcess.start) to use instead of spawning.
    ``env=None`` inherits this process's environment; otherwise the agent gets
    the SDK's minimal default environment (PATH, HOME, ...) overlaid with ``env``.
    With ``deliver_prompt=False`` (fault injection) the prompt is never sent and
    this waits until cancelled. Raises :class:`AgentStartError` if the agent
    cannot be spawned/initialized, ``ConnectionError`` if it dies mid-run, and
    ``acp.RequestError`` if it rejects the prompt. The subprocess (and its
    process group) is always gone when this returns or raises.
    """
    agent = agent if agent is not None and agent.alive else await AgentProcess.start(command, cwd=cwd, env=env)
    try:
        return await agent.run_prompt(cwd=cwd, prompt=prompt, sink=sink, deliver_prompt=deliver_prompt)
    finally:
        await agent.close()


# --------------------------------------------------------------------------- agent -> client


class _AgentEvents:
    """ACP ``Client`` callbacks; turns agent traffic into ordered sink calls.

    The SDK handles every incoming notification in its own task, so calling the
    sink from ``session_update`` could reorder output whenever the sink awaits.
    Instead ``session_update`` only enqueues (synchronously, in arrival order)
    and one pump task makes every sink call.
    """

    _END = object()

    def __init__(self) -> None:
        self._sink: SessionSink | None = None
        self._prompt_sha = ""
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._session_id: str | None = None
        self._delivered = False
        self._tool_titles: dict[str, str] = {}

    def attach(self, sink: SessionSink, prompt: str) -> None:
        """The run this agent now serves (an agent may be started before its run is known)."""
        self._sink = sink
        self._prompt_sha = _sha256(prompt)

    def begin_turn(self, session_id: str) -> None:
        """From now on, updates for ``session_id`` are turn content."""
        self._session_id = session_id

    def end_turn(self) -> None:
        """The prompt response arrived: the pump finishes after what is queued."""
        self._queue.put_nowait(self._END)

    async def pump(self) -> None:
        """Deliver queued updates to the sink until :meth:`end_turn`."""
        while (update := await self._queue.get()) is not self._END:
            await self._dispatch(update)
            # `get` does not yield while updates are queued: let the relay (and NATS's reader,
            # with its acks) run between updates, so publishing keeps pace with recording.
            await asyncio.sleep(0)
        # No update at all before the response: the response is the first sign.
        await self._mark_delivered(self._prompt_sha)

    async def session_update(self, session_id: str, update: Any, **_: Any) -> None:
        """ACP ``session/update`` handler (must not await: ordering, see class doc)."""
        if session_id != self._session_id or not isinstance(update, _TURN_UPDATES):
            log.debug("ignoring %s update for session %s", type(update).__name__, session_id)
            return
        self._queue.put_nowait(update)

    async def request_permission(
        self, session_id: str, tool_call: Any, options: list[PermissionOption], **_: Any
    ) -> RequestPermissionResponse:
        """Unattended run: approve with the first "allow" option, else decline."""
        choice = next((opt for opt in options if opt.kind.startswith("allow")), None)
        title = getattr(tool_call, "title", None) or getattr(tool_call, "tool_call_id", "?")
        if choice is None:
            log.warning("permission for %r: no allow option offered, declining", title)
            return RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))
        log.info("permission for %r: auto-selected %r (%s)", title, choice.option_id, choice.kind)
        return RequestPermissionResponse(outcome=AllowedOutcome(outcome="selected", option_id=choice.option_id))

    # We advertise no fs/terminal capabilities; refuse explicitly rather than let
    # the SDK's optional terminal routes answer ``null``.
    async def read_text_file(self, **_: Any) -> Any:
        raise RequestError.method_not_found("fs/read_text_file")

    async def write_text_file(self, **_: Any) -> Any:
        raise RequestError.method_not_found("fs/write_text_file")

    async def create_terminal(self, **_: Any) -> Any:
        raise RequestError.method_not_found("terminal/create")

    async def _dispatch(self, update: Any) -> None:
        if not self._delivered:
            await self._mark_delivered(self._echo_sha(update))
        if isinstance(update, UserMessageChunk):
            return  # the echo is proof of delivery, not output
        described = self._describe(update)
        if described is not None:
            assert self._sink is not None
            stream, text = described
            *lines, last = _lines_of(update, stream, text)
            for line in lines:
                await self._sink.output(stream, line)
            if _continues(update, stream):  # A piece of a runaway line (the shell agent marks them).
                await self._sink.output(stream, last, continues=True)
            else:
                await self._sink.output(stream, last)

    async def _mark_delivered(self, prompt_sha256: str) -> None:
        if not self._delivered:
            self._delivered = True
            assert self._sink is not None
            await self._sink.prompt_delivered(prompt_sha256)

    def _echo_sha(self, update: Any) -> str:
        # Hash what the agent says it received, so a mangled prompt is detectable.
        if isinstance(update, UserMessageChunk) and isinstance(update.content, TextContentBlock):
            return _sha256(update.content.text)
        return self._prompt_sha

    def _describe(self, update: Any) -> tuple[str, str] | None:
        if isinstance(update, AgentMessageChunk):
            meta_stream = (update.field_meta or {}).get(STREAM_META_KEY)
            stream = meta_stream if meta_stream in _AGENT_STREAMS else "message"
            return stream, _content_text(update.content)
        if isinstance(update, AgentThoughtChunk):
            return "message", _content_text(update.content)
        if isinstance(update, (ToolCallStart, ToolCallProgress)):
            return "tool", self._tool_text(update)
        return None  # plans: not output

    def _tool_text(self, update: ToolCallStart | ToolCallProgress) -> str:
        if update.title:
            self._tool_titles[update.tool_call_id] = update.title
        title = self._tool_titles.get(update.tool_call_id, update.tool_call_id)
        status = update.status or ("pending" if isinstance(update, ToolCallStart) else "updated")
        return f"{title} [{status}]"


def _lines_of(update: Any, stream: str, text: str) -> list[str]:
    """The output pieces one update carries: the lines of a chunk the shell agent marked
    `"baton.lines": N` (N whole lines, each ending in a newline), else the text as it is."""
    count = (update.field_meta or {}).get(LINES_META_KEY) if isinstance(update, AgentMessageChunk) else None
    if not isinstance(count, int) or count < 2 or stream not in _AGENT_STREAMS or not text.endswith("\n"):
        return [text]
    lines = text[:-1].split("\n")
    if len(lines) != count:
        log.warning("chunk says %s lines but holds %d; recording it as one piece", count, len(lines))
        return [text]
    return [line + "\n" for line in lines]


def _continues(update: Any, stream: str) -> bool:
    """Whether the agent marked this chunk `"baton.continues": true`: the next output of its
    stream continues the same line."""
    return (isinstance(update, AgentMessageChunk) and stream in _AGENT_STREAMS
            and (update.field_meta or {}).get(CONTINUES_META_KEY) is True)


def _content_text(block: Any) -> str:
    if isinstance(block, TextContentBlock):
        return block.text
    return f"[{getattr(block, 'type', 'content')}]"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- protocol steps


async def _initialize(
    conn: ClientSideConnection, proc: asyncio.subprocess.Process, stderr_tail: _StderrTail
) -> None:
    """ACP initialize; any failure becomes :class:`AgentStartError`."""
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            await conn.initialize(
                protocol_version=PROTOCOL_VERSION,
                client_capabilities=ClientCapabilities(
                    fs=FileSystemCapabilities(read_text_file=False, write_text_file=False), terminal=False
                ),
                client_info=Implementation(name="baton", version="0.1.0"),
            )
    except (RequestError, ConnectionError, OSError, TimeoutError) as exc:
        await stderr_tail.settle(proc)
        raise AgentStartError(_describe_failure("agent failed to initialize", exc, proc, stderr_tail)) from exc


async def _new_session(
    conn: ClientSideConnection, cwd: Path, proc: asyncio.subprocess.Process, stderr_tail: _StderrTail
) -> str:
    """ACP session/new in `cwd`; any failure becomes :class:`AgentStartError`."""
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            session = await conn.new_session(cwd=str(cwd), mcp_servers=[])
    except (RequestError, ConnectionError, OSError, TimeoutError) as exc:
        await stderr_tail.settle(proc)
        raise AgentStartError(_describe_failure("agent failed to open a session", exc, proc, stderr_tail)) from exc
    log.info("agent pid %s: session %s ready", proc.pid, session.session_id)
    return session.session_id


async def _run_turn(conn: ClientSideConnection, session_id: str, prompt: str, events: _AgentEvents) -> TurnResult:
    """Send the prompt; stream updates to the sink until the turn ends."""
    events.begin_turn(session_id)
    prompt_task = asyncio.create_task(conn.prompt(session_id=session_id, prompt=[text_block(prompt)]))
    pump_task = asyncio.create_task(events.pump())
    try:
        # The pump only finishes early if the sink raised: then abort the turn.
        await asyncio.wait({prompt_task, pump_task}, return_when=asyncio.FIRST_COMPLETED)
        if pump_task.done():
            pump_task.result()
        response = await prompt_task
        events.end_turn()
        await pump_task
    except BaseException:
        await _abort_turn(conn, session_id, prompt_task)
        pump_task.cancel()
        raise
    exit_code = (response.field_meta or {}).get(EXIT_CODE_META_KEY)
    return TurnResult(stop_reason=response.stop_reason, exit_code=exit_code if isinstance(exit_code, int) else None)


async def _abort_turn(conn: ClientSideConnection, session_id: str, prompt_task: asyncio.Task[Any]) -> None:
    """Ask the agent to cancel and give it a moment to end the turn itself."""
    if prompt_task.done():
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CANCEL_GRACE_S):
            await conn.cancel(session_id=session_id)
            await asyncio.wait({prompt_task})
    prompt_task.cancel()
    with contextlib.suppress(BaseException):
        await prompt_task


async def _withhold_prompt(proc: asyncio.subprocess.Process, stderr_tail: _StderrTail) -> NoReturn:
    """Fault injection: never send the prompt; wait until cancelled.

    If the agent dies meanwhile, that is reported (``ConnectionError``) rather
    than hidden behind the injected silence.
    """
    returncode = await proc.wait()
    await stderr_tail.settle(proc)
    raise ConnectionError(f"agent exited with {returncode} while the prompt was withheld; stderr: {stderr_tail.text()}")


async def _close_quietly(conn: ClientSideConnection) -> None:
    with contextlib.suppress(Exception):
        await conn.close()


# --------------------------------------------------------------------------- subprocess


class _StderrTail:
    """Drains the agent's stderr (a full pipe would block it) and keeps the tail."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._task = asyncio.create_task(self._drain(stream))

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # line over the limit: the reader dropped it
                continue
            if not raw:
                return
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self._lines.append(line)
            log.debug("agent stderr: %s", line)

    async def settle(self, proc: asyncio.subprocess.Process) -> None:
        """If the agent is dying, let its last words reach the tail (bounded)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_GRACE_S):
                await proc.wait()
                await asyncio.wait({self._task})

    def text(self) -> str:
        """The last stderr lines, or a placeholder."""
        return "\n".join(self._lines) or "<no stderr output>"

    def stop(self) -> None:
        """Stop draining (grandchildren may hold the pipe open forever)."""
        self._task.cancel()


def _describe_failure(what: str, exc: BaseException, proc: asyncio.subprocess.Process, tail: _StderrTail) -> str:
    status = "still running" if proc.returncode is None else f"exit code {proc.returncode}"
    reason = str(exc) or type(exc).__name__
    return f"{what} ({status}): {reason}\n--- agent stderr (tail) ---\n{tail.text()}"


@contextlib.asynccontextmanager
async def _agent_connection(
    command: Sequence[str], cwd: Path, env: Mapping[str, str] | None, events: _AgentEvents
) -> AsyncIterator[tuple[ClientSideConnection, asyncio.subprocess.Process, _StderrTail]]:
    """Spawn the agent (own process group) and connect ACP to its stdio; always tear both down."""
    proc = await _spawn(command, cwd, env)
    stderr_tail = _StderrTail(proc.stderr)  # type: ignore[arg-type]
    conn = connect_to_agent(events, proc.stdin, proc.stdout)
    log.info("agent pid %s started: %s", proc.pid, list(command))
    try:
        yield conn, proc, stderr_tail
    finally:
        try:
            # Process first, connection second: the still-running receive loop keeps
            # the agent's stdout drained so it can exit gracefully, and a dead pipe
            # unblocks any send the connection is stuck on before we close it.
            await _shutdown(proc)
            await _close_quietly(conn)
        finally:
            _signal_group(proc, signal.SIGKILL)  # sweep stragglers / interrupted shutdown
            stderr_tail.stop()


async def _spawn(command: Sequence[str], cwd: Path, env: Mapping[str, str] | None) -> asyncio.subprocess.Process:
    if not command:
        raise AgentStartError("empty agent command")
    full_env = dict(os.environ) if env is None else {**default_environment(), **env}
    try:
        # start_new_session: the agent leads its own process group, so teardown can
        # reach everything it spawned (and terminal signals don't hit it behind our back).
        return await asyncio.create_subprocess_exec(
            *command,
            cwd=str(cwd),
            env=full_env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=STDIO_LIMIT_BYTES,
            start_new_session=True,
        )
    except OSError as exc:
        raise AgentStartError(f"could not spawn agent {list(command)!r} in {cwd}: {exc}") from exc


async def _shutdown(proc: asyncio.subprocess.Process) -> None:
    """stdin EOF (polite ACP goodbye), then SIGTERM, then SIGKILL to the group."""
    if proc.stdin is not None:
        with contextlib.suppress(Exception):
            proc.stdin.close()
    for sig in (None, signal.SIGTERM):
        if sig is not None:
            _signal_group(proc, sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_GRACE_S):
                await proc.wait()
                return
    _signal_group(proc, signal.SIGKILL)
    await proc.wait()


def _signal_group(proc: asyncio.subprocess.Process, sig: int) -> None:
    # pgid == pid thanks to start_new_session=True.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
