"""TEST ONLY: a tiny real ACP agent whose prompt is its script, one step a line.

Run as `python tests/support/scripted_acp_agent.py` (stdio is the ACP channel). It exercises what a
real coding agent's turn holds, through the ACP SDK's own agent side:

    think TEXT            an agent_thought_chunk
    say TEXT              an agent_message_chunk, sent in two chunks (the second ends the line)
    plan A | B | C        a plan (first entry in_progress, others pending)
    write PATH CONTENT    tool_call (edit) → session/request_permission → fs/read_text_file (the old
                          text, if any) → fs/write_text_file → tool_call_update with the diff;
                          a refusal → tool_call_update failed, and `say write PATH: refused: …`
    read PATH             fs/read_text_file, then `say read PATH: TEXT` (or `… error: …`)
    run COMMAND           tool_call (execute) → permission → terminal/create (a shell command
                          line) → wait_for_exit → output → tool_call_update (terminal + output) → release
    usage USED SIZE COST  a usage_update (cost in USD)
    commands              an available_commands_update (a kind Baton does not record)
    tokens IN OUT         the PromptResponse's usage (IN + OUT = total)

In CONTENT, `\\n` is a newline. A relative PATH is taken in the session's cwd, as agents do.
Each session's prompts are kept in `$HOME/.scripted-acp-agent/`: `session/load` of a kept session
(in a later process with a copy of that home) replays them, else fails (resource not found).
The turn ends with `end_turn`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from acp import (
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
    AgentPlanUpdate,
    AgentThoughtChunk,
    AvailableCommand,
    AvailableCommandsUpdate,
    ContentToolCallContent,
    Cost,
    FileEditToolCallContent,
    Implementation,
    LoadSessionResponse,
    PermissionOption,
    PlanEntry,
    TerminalToolCallContent,
    TextContentBlock,
    ToolCallLocation,
    ToolCallProgress,
    ToolCallStart,
    ToolCallUpdate,
    Usage,
    UsageUpdate,
    UserMessageChunk,
)

log = logging.getLogger("scripted-acp-agent")

PERMISSION_OPTIONS = [
    PermissionOption(option_id="always", name="Always allow", kind="allow_always"),
    PermissionOption(option_id="once", name="Allow once", kind="allow_once"),
    PermissionOption(option_id="no", name="Reject", kind="reject_once"),
]


class ScriptedAgent:
    def __init__(self) -> None:
        self._conn: Client | None = None
        self._cwd: dict[str, str] = {}
        self._calls = 0

    def on_connect(self, conn: Client) -> None:
        self._conn = conn

    async def initialize(self, protocol_version: int, **_: Any) -> InitializeResponse:
        return InitializeResponse(protocol_version=PROTOCOL_VERSION,
                                  agent_capabilities=AgentCapabilities(load_session=True),
                                  agent_info=Implementation(name="scripted-acp-agent", version="0.1.0"))

    async def load_session(self, cwd: str, session_id: str, **_: Any) -> LoadSessionResponse:
        """A session an earlier process of this agent kept in `$HOME` (as real agents keep theirs):
        its history is replayed (each prompt, then `loaded`), as ACP's `session/load` does."""
        kept = _session_file(session_id)
        if not kept.is_file():
            raise RequestError.resource_not_found(str(kept))
        self._cwd[session_id] = cwd
        for earlier in kept.read_text().split("\0")[:-1]:
            await self._update(session_id, UserMessageChunk(session_update="user_message_chunk",
                                                            content=text_block(earlier)))
            await self._update(session_id, AgentMessageChunk(session_update="agent_message_chunk",
                                                             content=text_block(f"earlier: {earlier}\n")))
        return LoadSessionResponse()

    async def new_session(self, cwd: str, **_: Any) -> NewSessionResponse:
        session_id = uuid.uuid4().hex
        self._cwd[session_id] = cwd
        return NewSessionResponse(session_id=session_id)

    async def cancel(self, session_id: str, **_: Any) -> None:
        return None

    async def prompt(self, prompt: list[Any], session_id: str, **_: Any) -> PromptResponse:
        script = "".join(block.text for block in prompt if isinstance(block, TextContentBlock))
        _session_file(session_id).parent.mkdir(parents=True, exist_ok=True)
        with _session_file(session_id).open("a") as kept:
            kept.write(script + "\0")
        usage = None
        for line in script.splitlines():
            verb, _, rest = line.strip().partition(" ")
            if verb == "tokens":
                tokens_in, tokens_out = (int(n) for n in rest.split())
                usage = Usage(input_tokens=tokens_in, output_tokens=tokens_out, total_tokens=tokens_in + tokens_out)
            elif verb:
                await getattr(self, f"_step_{verb}")(session_id, rest)
        return PromptResponse(stop_reason="end_turn", usage=usage)

    # ------------------------------------------------------------------ steps

    async def _step_think(self, session_id: str, text: str) -> None:
        await self._update(session_id, AgentThoughtChunk(session_update="agent_thought_chunk",
                                                         content=text_block(text + "\n")))

    async def _step_say(self, session_id: str, text: str) -> None:
        half = len(text) // 2
        for piece in (text[:half], text[half:] + "\n"):
            await self._update(session_id, AgentMessageChunk(session_update="agent_message_chunk",
                                                             content=text_block(piece)))

    async def _step_plan(self, session_id: str, text: str) -> None:
        steps = [step.strip() for step in text.split("|")]
        entries = [PlanEntry(content=step, priority="medium", status="in_progress" if i == 0 else "pending")
                   for i, step in enumerate(steps)]
        await self._update(session_id, AgentPlanUpdate(session_update="plan", entries=entries))

    async def _step_usage(self, session_id: str, text: str) -> None:
        used, size, cost = text.split()
        await self._update(session_id, UsageUpdate(session_update="usage_update", used=int(used), size=int(size),
                                                   cost=Cost(amount=float(cost), currency="USD")))

    async def _step_commands(self, session_id: str, _: str) -> None:
        commands = [AvailableCommand(name="review", description="Review the changes")]
        await self._update(session_id, AvailableCommandsUpdate(session_update="available_commands_update",
                                                               available_commands=commands))

    async def _step_read(self, session_id: str, path: str) -> None:
        try:
            response = await self._client.read_text_file(session_id=session_id, path=self._abs(session_id, path))
            await self._step_say(session_id, f"read {path}: {response.content}")
        except RequestError as error:
            await self._step_say(session_id, f"read {path}: error: {_reason(error)}")

    async def _step_write(self, session_id: str, text: str) -> None:
        path, _, content = text.partition(" ")
        content = content.replace("\\n", "\n")
        target = self._abs(session_id, path)
        call_id = await self._start_call(session_id, f"Write {path}", "edit", target)
        if not await self._allowed(session_id, call_id, f"Write {path}"):
            return await self._end_call(session_id, call_id, "failed", [_text("not allowed")])
        try:
            old = (await self._client.read_text_file(session_id=session_id, path=target)).content
        except RequestError:
            old = None
        try:
            await self._client.write_text_file(session_id=session_id, path=target, content=content)
        except RequestError as error:
            await self._end_call(session_id, call_id, "failed", [_text(_reason(error))])
            return await self._step_say(session_id, f"write {path}: refused: {_reason(error)}")
        diff = FileEditToolCallContent(type="diff", path=target, old_text=old, new_text=content)
        await self._end_call(session_id, call_id, "completed", [diff])

    async def _step_run(self, session_id: str, command: str) -> None:
        call_id = await self._start_call(session_id, f"Run {command}", "execute", None)
        if not await self._allowed(session_id, call_id, f"Run {command}"):
            return await self._end_call(session_id, call_id, "failed", [_text("not allowed")])
        created = await self._client.create_terminal(session_id=session_id, command=command,
                                                     cwd=self._cwd[session_id], output_byte_limit=65536)
        terminal_id = created.terminal_id
        exit_status = await self._client.wait_for_terminal_exit(session_id=session_id, terminal_id=terminal_id)
        output = await self._client.terminal_output(session_id=session_id, terminal_id=terminal_id)
        status = "completed" if exit_status.exit_code == 0 else "failed"
        await self._end_call(session_id, call_id, status,
                             [TerminalToolCallContent(type="terminal", terminal_id=terminal_id)])
        await self._client.release_terminal(session_id=session_id, terminal_id=terminal_id)
        await self._step_say(session_id, f"run exited with {exit_status.exit_code}: {output.output.strip()}")

    # ------------------------------------------------------------------ helpers

    async def _start_call(self, session_id: str, title: str, kind: str, path: str | None) -> str:
        self._calls += 1
        call_id = f"call-{self._calls}"
        locations = [ToolCallLocation(path=path)] if path else None
        await self._update(session_id, ToolCallStart(
            session_update="tool_call", tool_call_id=call_id, title=title, kind=kind, status="pending",
            locations=locations, raw_input={"title": title}))
        return call_id

    async def _allowed(self, session_id: str, call_id: str, title: str) -> bool:
        response = await self._client.request_permission(
            session_id=session_id, options=PERMISSION_OPTIONS,
            tool_call=ToolCallUpdate(tool_call_id=call_id, title=title))
        outcome = response.outcome
        return getattr(outcome, "option_id", None) == "once"  # Gemini fails on "always": so do we.

    async def _end_call(self, session_id: str, call_id: str, status: str, content: list[Any]) -> None:
        await self._update(session_id, ToolCallProgress(session_update="tool_call_update", tool_call_id=call_id,
                                                        status=status, content=content))

    async def _update(self, session_id: str, update: Any) -> None:
        await self._client.session_update(session_id=session_id, update=update)

    def _abs(self, session_id: str, path: str) -> str:
        return path if path.startswith("/") else str(PurePosixPath(self._cwd[session_id]) / path)

    @property
    def _client(self) -> Client:
        assert self._conn is not None
        return self._conn


def _session_file(session_id: str) -> Path:
    """Where a session's prompts are kept, in the agent's home (its id is a hex uuid)."""
    return Path.home() / ".scripted-acp-agent" / f"{PurePosixPath(session_id).name}.prompts"


def _text(text: str) -> ContentToolCallContent:
    return ContentToolCallContent(type="content", content=text_block(text))


def _reason(error: RequestError) -> str:
    data = error.data if isinstance(error.data, dict) else {}
    return str(data.get("reason") or error)


def main() -> None:
    logging.basicConfig(stream=sys.stderr, level=os.environ.get("SCRIPTED_AGENT_LOG_LEVEL", "INFO"))
    asyncio.run(run_agent(ScriptedAgent()))


if __name__ == "__main__":
    main()
