"""Claude Code, started as Baton starts the `claude` kind, does a turn against a scripted model.

The real adapter (`@agentclientprotocol/claude-agent-acp`, pinned by the kind) runs its real
Claude Code, which talks the Anthropic Messages API to `tests/support/fake_anthropic.py`;
the vm_agent's own ACP client drives it. No network: the fake is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from vm_agent.acp_session import TurnResult, start_agent_with_prompt
from vm_agent.backends import AGENT_KINDS
from vm_agent.sandbox import agent_environment
from tests.support.fake_anthropic import ClaudeScript, FakeAnthropic, running_fake_anthropic

CLAUDE = AGENT_KINDS["claude"]
TURN_DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def agents_dir(installed_agents: Callable[..., Path]) -> Path:
    """The machine-wide agents dir, with the pinned Claude adapter installed (once per machine)."""
    return installed_agents("claude")


class RecordingSink:
    """A SessionSink that keeps every call, in order."""

    def __init__(self) -> None:
        self.delivered: list[str] = []
        self.outputs: list[tuple[str, str]] = []
        self.reports: list[object] = []

    async def agent_started(self, session_id: str) -> None:
        pass

    async def prompt_delivered(self, prompt_sha256: str) -> None:
        self.delivered.append(prompt_sha256)

    async def output(self, stream: str, text: str, *, continues: bool = False) -> None:
        self.outputs.append((stream, text))

    async def report(self, event: object) -> None:
        self.reports.append(event)

    def reported(self, type_name: str) -> list[dict]:
        return [event.model_dump() for event in self.reports if type(event).__name__ == type_name]


async def _run_claude(agents_dir: Path, fake: FakeAnthropic, *, workspace: Path, home: Path,
                      prompt: str, sink: RecordingSink, proxy: str | None = None) -> TurnResult:
    """Start the `claude` kind as the vm_agent does outside a sandbox: its declared variables
    taken from the environment, its fixed ones added, its `prepare` hook run."""
    environ = {**os.environ, "ANTHROPIC_BASE_URL": fake.url, "ANTHROPIC_API_KEY": fake.api_key}
    if proxy:
        environ.update(HTTPS_PROXY=proxy, HTTP_PROXY=proxy, NO_PROXY="127.0.0.1")
    env = CLAUDE.environment(home, {**agent_environment(environ, CLAUDE.env), "HOME": str(home)})
    return await asyncio.wait_for(
        start_agent_with_prompt(CLAUDE.command_in(agents_dir), cwd=workspace, prompt=prompt, sink=sink, env=env),
        timeout=TURN_DEADLINE_S)


@pytest.mark.asyncio
async def test_claude_writes_the_scripted_file_and_reports_tool_call_permission_and_usage(
    agents_dir: Path, tmp_path: Path,
) -> None:
    nonce = secrets.token_hex(8)
    prompt = f"Write the nonce {nonce} into nonce.txt"
    workspace, home = tmp_path / "workspace", tmp_path / "home"
    workspace.mkdir()
    home.mkdir()
    api_key = f"sk-ant-fake-{secrets.token_hex(12)}"
    script = ClaudeScript(file_name="nonce.txt", file_content=f"{nonce}\n", final_text=f"Done {nonce}.")
    sink = RecordingSink()

    with running_fake_anthropic(api_key, script) as fake:
        result = await _run_claude(agents_dir, fake, workspace=workspace, home=home, prompt=prompt, sink=sink)

    assert result.stop_reason == "end_turn"
    # The prompt reached the model, with the key the kind was given, and nothing was refused.
    assert sink.delivered == [hashlib.sha256(prompt.encode()).hexdigest()]
    assert fake.saw(nonce) and fake.refused == 0
    # The scripted Write ran in the workspace; the agent's final words came back as a message.
    assert (workspace / "nonce.txt").read_text() == f"{nonce}\n"
    assert ("message", f"Done {nonce}.") in sink.outputs
    _assert_the_write_was_reported(sink, "nonce.txt", f"{nonce}\n")
    # Asked, not decided by Claude Code's own classifier: the kind starts it in "default" mode.
    [asked] = sink.reported("PermissionRequested")
    [answered] = sink.reported("PermissionAnswered")
    assert answered["request_id"] == asked["request_id"] and answered["by"] == "policy:auto"
    assert answered["option_id"] == "allow-once"
    # The turn's tokens are those the fake reported for the scripted calls.
    turn_usage = [u for u in sink.reported("UsageRecorded") if u["source"] == "prompt_response"]
    assert [(u["input_tokens"], u["output_tokens"]) for u in turn_usage] == [fake.reported_usage]
    # The key reached the model and nothing else.
    assert api_key not in json.dumps([repr(e) for e in sink.reports] + sink.outputs)


def _assert_the_write_was_reported(sink: RecordingSink, path: str, content: str) -> None:
    """One edit tool call, whose diff (`path` relative to the workspace) made `content`, completed. The
    diff comes with the start or an update: Claude Code may ask permission (the adapter then announces
    the call, input and all) before or after the call's tool_use block streams in."""
    [started] = sink.reported("ToolCallStarted")
    assert started["kind"] == "edit"
    updates = [u for u in sink.reported("ToolCallUpdated") if u["tool_call_id"] == started["tool_call_id"]]
    diffs = [diff for update in [started, *updates] for diff in update["diffs"]]
    assert {"path": path, "new_text": content} in [
        {"path": d["path"], "new_text": d["new_text"]} for d in diffs], (started, updates)
    assert updates[-1]["status"] == "completed", updates


@pytest.mark.asyncio
async def test_claude_reaches_nothing_but_the_model_api(agents_dir: Path, tmp_path: Path) -> None:
    # Every other host it would call (telemetry, feature flags…) goes through this proxy,
    # which answers nothing: with the kind's offline flags it is never asked.
    proxy_requests: list[bytes] = []

    async def note_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proxy_requests.append(await reader.readline())
        writer.close()

    proxy = await asyncio.start_server(note_request, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    workspace, home = tmp_path / "workspace", tmp_path / "home"
    workspace.mkdir()
    home.mkdir()
    try:
        with running_fake_anthropic("sk-ant-fake", ClaudeScript("a.txt", "a\n")) as fake:
            result = await _run_claude(agents_dir, fake, workspace=workspace, home=home,
                                       prompt="write a.txt", sink=RecordingSink(), proxy=proxy_url)
    finally:
        proxy.close()

    assert result.stop_reason == "end_turn"
    assert proxy_requests == []
    # The model saw the turn's calls and the title, no post-turn prompt suggestion.
    assert not any("SUGGESTION MODE" in json.dumps(body) for body in fake.messages())
