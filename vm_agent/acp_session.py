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
from pathlib import Path, PurePosixPath
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
    ClientCapabilities,
    FileSystemCapabilities,
    Implementation,
    PermissionOption,
    RequestPermissionResponse,
    TextContentBlock,
    ToolCallProgress,
    ToolCallStart,
    UsageUpdate,
    UserMessageChunk,
)

from events import BaseEvent
from vm_agent.client_requests import ClientRequests
from vm_agent.domain import TurnEvent
from vm_agent.permissions import PermissionDesk
from vm_agent.terminals import LaunchCommand, Terminals
from vm_agent.turn_events import (
    plan_updated,
    tool_call_started,
    tool_call_updated,
    usage_of_response,
    usage_of_update,
)
from vm_agent.workspace_files import WorkspaceFiles

log = logging.getLogger(__name__)

__all__ = ["AgentProcess", "AgentStartError", "SessionSink", "TurnResult", "WorkspaceAccess", "start_agent_with_prompt"]

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
# A message or thought is recorded a line at a time; one without a newline this long goes out
# in pieces (marked `continues`).
_TEXT_PIECE_CHARS = 16 * 1024


class SessionSink(Protocol):
    """Receives the progress of one agent run."""

    async def agent_started(self, session_id: str, **restoration: str) -> None:
        """initialize + session/new (or session/load) succeeded; ``session_id`` is the agent's.
        ``restoration`` (only when an earlier session was asked for): ``resumed_from``,
        ``restored`` ("loaded" or "new") and, for a new one, ``restore_note`` saying why."""

    async def prompt_delivered(self, prompt_sha256: str) -> None:
        """The agent accepted the prompt (called once, before any ``output``)."""

    async def output(self, stream: str, text: str, *, continues: bool = False) -> None:
        """Agent output; ``stream`` is one of "stdout", "stderr", "message", "thought";
        ``continues``: the next output of this stream continues this line."""

    async def report(self, event: TurnEvent) -> None:
        """A tool call, plan, usage or permission event of the turn, in order with the output."""


@dataclass(frozen=True)
class WorkspaceAccess:
    """What the agent may reach through its client: `files` (its workspace), and terminals that
    `launch_command` starts in its sandbox (None: it gets none), and who answers its permission
    requests."""

    files: WorkspaceFiles
    launch_command: LaunchCommand | None = None
    permissions: PermissionDesk | None = None
    """Where a person answers the agent's permission requests (the `ask` policy); None: `auto`."""


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
        self.session_id: str | None = None
        """The ACP session the last `run_prompt` opened; a follow-up (`run_next_turn`) plays in it."""
        self.loads_sessions = False
        """The agent advertised `agentCapabilities.loadSession` at initialize."""

    @classmethod
    async def start(
        cls, command: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None,
        session_cwd: Path | None = None, offer_workspace: bool = False, offer_reads: bool = True,
    ) -> AgentProcess:
        """Spawn `command` in `cwd` and run ACP initialize; raises AgentStartError.

        `session_cwd`: the workspace as the agent sees it (in a sandbox, not the host's path);
        its session opens there whatever `run_prompt` is told. `offer_workspace`: tell the agent
        its client serves `fs/*` and `terminal/*` (then give `run_prompt` a WorkspaceAccess with
        a `launch_command`, or terminals are refused); `offer_reads=False` leaves `fs/read_text_file` out."""
        agent = cls(command)
        agent.session_cwd = session_cwd
        connection = _agent_connection(command, Path(cwd).resolve(), env, agent._events)
        agent._conn, agent._proc, agent._stderr_tail = await agent._stack.enter_async_context(connection)
        try:
            agent.loads_sessions = await _initialize(agent._conn, agent._proc, agent._stderr_tail,
                                                     offer_workspace=offer_workspace, offer_reads=offer_reads)
        except BaseException:
            await agent.close()
            raise
        return agent

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def run_prompt(
        self, *, cwd: Path, prompt: str, sink: SessionSink, deliver_prompt: bool = True,
        access: WorkspaceAccess | None = None, resume_session_id: str | None = None,
    ) -> TurnResult:
        """Open a session in `cwd` and play one prompt turn (see start_agent_with_prompt).
        `access`: what the agent's `fs/*` and `terminal/*` requests reach (default: the files of
        `cwd`, no terminals). `resume_session_id`: an earlier session of the task's agent to load
        (ACP `session/load`) instead of opening a new one; the sink's `agent_started` then says
        how it went (`resumed_from`, `restored`, `restore_note`)."""
        assert self._conn and self._proc and self._stderr_tail, "start() first"
        workspace = self.session_cwd or Path(cwd).resolve()
        self._events.attach(sink, prompt, access or WorkspaceAccess(WorkspaceFiles(Path(cwd).resolve(), workspace)))
        if resume_session_id is None:
            self.session_id = await _new_session(self._conn, workspace, self._proc, self._stderr_tail)
            await sink.agent_started(self.session_id)
        else:
            self.session_id, restoration = await self._restore_session(resume_session_id, workspace)
            await sink.agent_started(self.session_id, resumed_from=resume_session_id, **restoration)
        if not deliver_prompt:
            await _withhold_prompt(self._proc, self._stderr_tail)
        return await self._turn(prompt)

    async def _restore_session(self, session_id: str, workspace: Path) -> tuple[str, dict[str, str]]:
        """`session_id` loaded (`restored: loaded`) when the agent can load sessions and the load
        works, else a new session (`restored: new`, `restore_note` saying why). The history the
        agent replays while loading is the earlier turns' (already on the record): not output."""
        assert self._conn and self._proc and self._stderr_tail
        if not self.loads_sessions:
            note = "the agent cannot load sessions (no loadSession capability): a new session"
        else:
            self._events.begin_turn(None)  # The replayed session/update history is ignored.
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                    await self._conn.load_session(cwd=str(workspace), session_id=session_id, mcp_servers=[])
            except (RequestError, ConnectionError, OSError, TimeoutError) as exc:
                note = f"session/load failed ({str(exc) or type(exc).__name__}): a new session"
                log.warning("agent pid %s: could not load session %s: %s", self._proc.pid, session_id, note)
            else:
                log.info("agent pid %s: session %s loaded", self._proc.pid, session_id)
                return session_id, {"restored": "loaded"}
        new_id = await _new_session(self._conn, workspace, self._proc, self._stderr_tail)
        return new_id, {"restored": "new", "restore_note": note[:500]}

    async def run_next_turn(self, *, prompt: str, sink: SessionSink, access: WorkspaceAccess) -> TurnResult:
        """Play one more prompt turn (a follow-up) in the session `run_prompt` opened: the agent
        keeps what it learned in the turns before."""
        assert self._conn and self.session_id, "run_prompt() first"
        self._events.attach(sink, prompt, access)
        return await self._turn(prompt)

    async def _turn(self, prompt: str) -> TurnResult:
        assert self._conn and self._proc and self._stderr_tail and self.session_id
        try:
            return await _run_turn(self._conn, self.session_id, prompt, self._events)
        except ConnectionError as exc:
            await self._stderr_tail.settle(self._proc)
            failure = _describe_failure("agent connection lost mid-turn", exc, self._proc, self._stderr_tail)
            raise ConnectionError(failure) from exc
        finally:
            self._events.detach()

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
    Instead ``session_update`` (and a request that records an event) only enqueues
    (synchronously, in arrival order) and one pump task makes every sink call.
    """

    _END = object()

    def __init__(self) -> None:
        self._sink: SessionSink | None = None
        self._prompt_sha = ""
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._session_id: str | None = None
        self._delivered = False
        self._held: list[Any] = []  # Usage reported before the prompt's delivery is known.
        self._requests: ClientRequests | None = None
        self._text_stream: str | None = None  # A message or thought line being gathered.
        self._text = ""

    def attach(self, sink: SessionSink, prompt: str, access: WorkspaceAccess) -> None:
        """The run this agent now serves (an agent may be started before its run is known)."""
        self._sink = sink
        self._prompt_sha = _sha256(prompt)
        self._delivered, self._held = False, []  # Each turn proves its own prompt's delivery.
        terminals = (Terminals(access.launch_command, workspace_view=PurePosixPath(access.files.view))
                     if access.launch_command is not None else None)
        self._requests = ClientRequests(access.files, terminals, self._queue.put_nowait, access.permissions)

    def detach(self) -> None:
        """The run is over: its terminals are killed."""
        if self._requests is not None:
            self._requests.close()

    def begin_turn(self, session_id: str | None) -> None:
        """From now on, updates for ``session_id`` are turn content."""
        self._session_id = session_id

    def record(self, event: TurnEvent) -> None:
        """An event of the turn, in order after everything received so far."""
        self._queue.put_nowait(event)

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
        await self._flush_text()
        # No update at all before the response: the response is the first sign.
        await self._mark_delivered(self._prompt_sha)

    async def session_update(self, session_id: str, update: Any, **_: Any) -> None:
        """ACP ``session/update`` handler (must not await: ordering, see class doc)."""
        if session_id != self._session_id or not isinstance(update, (*_TURN_UPDATES, UsageUpdate)):
            log.debug("ignoring %s update for session %s", type(update).__name__, session_id)
            return
        if isinstance(update, (ToolCallStart, ToolCallProgress)):
            # Now, not when the pump gets to it: a terminal it shows may be released by then.
            self._queue.put_nowait(self._event_of(update))
            return
        self._queue.put_nowait(update)

    async def request_permission(
        self, session_id: str, tool_call: Any, options: list[PermissionOption], **_: Any
    ) -> RequestPermissionResponse:
        return await self._serving().request_permission(tool_call, options)

    async def read_text_file(self, session_id: str, path: str, line: int | None = None,
                             limit: int | None = None, **_: Any) -> Any:
        return await self._serving().read_text_file(path, line, limit)

    async def write_text_file(self, session_id: str, path: str, content: str, **_: Any) -> Any:
        return await self._serving().write_text_file(path, content)

    async def create_terminal(self, session_id: str, command: str, args: list[str] | None = None,
                              env: list[Any] | None = None, cwd: str | None = None,
                              output_byte_limit: int | None = None, **_: Any) -> Any:
        return await self._serving().create_terminal(command, args, env, cwd, output_byte_limit)

    async def terminal_output(self, session_id: str, terminal_id: str, **_: Any) -> Any:
        return await self._serving().terminal_output(terminal_id)

    async def wait_for_terminal_exit(self, session_id: str, terminal_id: str, **_: Any) -> Any:
        return await self._serving().wait_for_terminal_exit(terminal_id)

    async def kill_terminal(self, session_id: str, terminal_id: str, **_: Any) -> Any:
        return await self._serving().kill_terminal(terminal_id)

    async def release_terminal(self, session_id: str, terminal_id: str, **_: Any) -> Any:
        return await self._serving().release_terminal(terminal_id)

    def _serving(self) -> ClientRequests:
        if self._requests is None:  # A warm agent asking before it has a run.
            raise RequestError.invalid_request({"reason": "no session is open yet"})
        return self._requests

    async def _dispatch(self, update: Any) -> None:
        if isinstance(update, UsageUpdate) and not self._delivered:
            self._held.append(update)  # Session metadata is no proof the prompt arrived.
            return
        if not self._delivered:
            await self._mark_delivered(self._echo_sha(update))
        if isinstance(update, UserMessageChunk):
            return  # the echo is proof of delivery, not output
        if isinstance(update, (AgentMessageChunk, AgentThoughtChunk)):
            await self._chunk(update)
            return
        await self._flush_text()
        event = self._event_of(update)
        if event is not None:
            assert self._sink is not None
            await self._sink.report(event)

    def _event_of(self, update: Any) -> TurnEvent | None:
        """The event an update (or a recorded request) is, None for those that are none."""
        if isinstance(update, BaseEvent):
            return update  # type: ignore[return-value]
        assert self._requests is not None
        display, terminal_output = self._requests.files.display_path, self._requests.terminal_output_text
        if isinstance(update, ToolCallStart):
            return tool_call_started(update, display=display, terminal_output=terminal_output)
        if isinstance(update, ToolCallProgress):
            return tool_call_updated(update, display=display, terminal_output=terminal_output)
        if isinstance(update, AgentPlanUpdate):
            return plan_updated(update)
        if isinstance(update, UsageUpdate):
            return usage_of_update(update)
        return None

    async def _chunk(self, update: AgentMessageChunk | AgentThoughtChunk) -> None:
        """A message or thought chunk becomes lines; the shell agent's stdout/stderr pieces go as
        it marked them."""
        assert self._sink is not None
        meta_stream = (update.field_meta or {}).get(STREAM_META_KEY)
        if isinstance(update, AgentMessageChunk) and meta_stream in _AGENT_STREAMS:
            await self._flush_text()
            *lines, last = _lines_of(update, meta_stream, _content_text(update.content))
            for line in lines:
                await self._sink.output(meta_stream, line)
            await self._sink.output(meta_stream, last, continues=_continues(update, meta_stream))
            return
        stream = "thought" if isinstance(update, AgentThoughtChunk) else "message"
        if self._text_stream != stream:
            await self._flush_text()
        self._text_stream = stream
        *lines, self._text = (self._text + _content_text(update.content)).split("\n")
        for line in lines:
            await self._sink.output(stream, line + "\n")
        while len(self._text) >= _TEXT_PIECE_CHARS:  # A runaway line: out in pieces.
            piece, self._text = self._text[:_TEXT_PIECE_CHARS], self._text[_TEXT_PIECE_CHARS:]
            await self._sink.output(stream, piece, continues=True)

    async def _flush_text(self) -> None:
        """The message or thought line gathered so far ends here (something else comes next)."""
        if self._text_stream is not None and self._text:
            assert self._sink is not None
            await self._sink.output(self._text_stream, self._text)
        self._text_stream, self._text = None, ""

    async def _mark_delivered(self, prompt_sha256: str) -> None:
        if not self._delivered:
            self._delivered = True
            assert self._sink is not None
            await self._sink.prompt_delivered(prompt_sha256)
            for update in self._held:
                await self._sink.report(usage_of_update(update))
            self._held.clear()

    def _echo_sha(self, update: Any) -> str:
        # Hash what the agent says it received, so a mangled prompt is detectable.
        if isinstance(update, UserMessageChunk) and isinstance(update.content, TextContentBlock):
            return _sha256(update.content.text)
        return self._prompt_sha


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
    conn: ClientSideConnection, proc: asyncio.subprocess.Process, stderr_tail: _StderrTail, *,
    offer_workspace: bool, offer_reads: bool = True,
) -> bool:
    """ACP initialize, offering `fs/*` and `terminal/*` if `offer_workspace`; whether the agent
    can load sessions (`agentCapabilities.loadSession`). Any failure becomes :class:`AgentStartError`."""
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            response = await conn.initialize(
                protocol_version=PROTOCOL_VERSION,
                client_capabilities=ClientCapabilities(
                    fs=FileSystemCapabilities(read_text_file=offer_workspace and offer_reads,
                                              write_text_file=offer_workspace),
                    terminal=offer_workspace,
                ),
                client_info=Implementation(name="baton", version="0.1.0"),
            )
    except (RequestError, ConnectionError, OSError, TimeoutError) as exc:
        await stderr_tail.settle(proc)
        raise AgentStartError(_describe_failure("agent failed to initialize", exc, proc, stderr_tail)) from exc
    capabilities = response.agent_capabilities
    return bool(capabilities is not None and capabilities.load_session)


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
        usage = usage_of_response(response)
        if usage is not None:
            events.record(usage)
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
