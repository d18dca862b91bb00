"""Codex, started as Baton starts the `codex` kind, does a turn against a scripted model.

The real adapter (`@agentclientprotocol/codex-acp`, pinned by the kind) runs its real Codex
(`codex app-server`), which talks the OpenAI Responses API to
`tests/support/fake_openai_responses.py`; the vm_agent's own ACP client drives it. No network:
the fake is on 127.0.0.1, and a proxy that answers nothing catches any other host it would call.
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

from tests.support.fake_openai_responses import FakeOpenAIResponses, ResponsesScript, fake_openai_responses
from vm_agent.acp_session import TurnResult, start_agent_with_prompt
from vm_agent.backends import AGENT_KINDS
from vm_agent.sandbox import agent_environment

CODEX = AGENT_KINDS["codex"]
TURN_DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def agents_dir(installed_agents: Callable[..., Path]) -> Path:
    """The machine-wide agents dir, with the pinned Codex adapter installed (once per machine)."""
    return installed_agents("codex")


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


async def _run_codex(agents_dir: Path, fake: FakeOpenAIResponses, *, workspace: Path, home: Path,
                     prompt: str, sink: RecordingSink, proxy: str | None = None) -> TurnResult:
    """Start the `codex` kind as the vm_agent does outside a sandbox: its declared variables
    taken from the environment, its fixed ones added, its `prepare` hook run."""
    environ = {**os.environ, "OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": fake.api_key}
    if proxy:
        environ.update(HTTPS_PROXY=proxy, HTTP_PROXY=proxy, ALL_PROXY=proxy, NO_PROXY="127.0.0.1")
    env = CODEX.environment(home, {**agent_environment(environ, CODEX.env), "HOME": str(home)})
    return await asyncio.wait_for(
        start_agent_with_prompt(CODEX.command_in(agents_dir), cwd=workspace, prompt=prompt, sink=sink, env=env),
        timeout=TURN_DEADLINE_S)


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    workspace, home = tmp_path / "workspace", tmp_path / "home"
    workspace.mkdir()
    home.mkdir()
    return workspace, home


@pytest.mark.asyncio
async def test_codex_writes_the_scripted_file_and_reports_the_patch_and_usage(
    agents_dir: Path, tmp_path: Path,
) -> None:
    nonce = secrets.token_hex(8)
    prompt = f"Write the nonce {nonce} into nonce.txt"
    workspace, home = _dirs(tmp_path)
    api_key = f"sk-fake-{secrets.token_hex(12)}"
    script = ResponsesScript(file_name="nonce.txt", content=nonce, final_message=f"Done {nonce}.")
    sink = RecordingSink()

    with fake_openai_responses(api_key=api_key, script=script) as fake:
        result = await _run_codex(agents_dir, fake, workspace=workspace, home=home, prompt=prompt, sink=sink)

    assert result.stop_reason == "end_turn"
    # The prompt reached the model, with the key the kind was given, and nothing was refused.
    assert sink.delivered == [hashlib.sha256(prompt.encode()).hexdigest()]
    assert fake.saw(nonce) and fake.refused == 0
    # The scripted patch was applied in the workspace; the final words came back as a message.
    assert (workspace / "nonce.txt").read_text() == f"{nonce}\n"
    assert ("message", f"Done {nonce}.") in sink.outputs
    _assert_the_patch_was_reported(sink, workspace / "nonce.txt", f"{nonce}\n")
    # Codex ran every tool call unasked (Baton's sandbox confines it), with no review model calls.
    assert sink.reported("PermissionRequested") == []
    assert len(fake.responses_requests()) == 2
    # The turn's tokens are the sum of what the fake reported for its two responses.
    turn_usage = [u for u in sink.reported("UsageRecorded") if u["source"] == "prompt_response"]
    assert [(u["input_tokens"], u["output_tokens"]) for u in turn_usage] == [fake.turn_usage]
    # The key reached the model and nothing else: not the events, nor a file in Codex's home.
    assert api_key not in json.dumps([repr(e) for e in sink.reports] + sink.outputs)
    assert not [path for path in home.rglob("*") if path.is_file() and api_key.encode() in path.read_bytes()]
    # The adapter, its launcher and `codex app-server` are all gone with the turn.
    assert _processes_with(f"CODEX_HOME={home}/.codex") == []


def _processes_with(variable: str) -> list[int]:
    """The processes whose environment holds `variable` (NAME=value)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if variable.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue  # Gone meanwhile, or not ours to read.
    return found


def _assert_the_patch_was_reported(sink: RecordingSink, path: Path, content: str) -> None:
    [started] = sink.reported("ToolCallStarted")
    assert started["kind"] == "edit", started
    updates = [u for u in sink.reported("ToolCallUpdated") if u["tool_call_id"] == started["tool_call_id"]]
    diffs = [diff for update in [started, *updates] for diff in update.get("diffs") or ()]
    # Codex names the file as its patch did: relative to the workspace.
    assert (path, content) in [(path.parent / d["path"], d["new_text"]) for d in diffs], (started, updates)
    assert updates[-1]["status"] == "completed", updates


@pytest.mark.asyncio
async def test_the_commands_codex_runs_do_not_see_its_key(agents_dir: Path, tmp_path: Path) -> None:
    workspace, home = _dirs(tmp_path)
    api_key = f"sk-fake-{secrets.token_hex(12)}"
    sink = RecordingSink()

    with fake_openai_responses(api_key=api_key, script=ResponsesScript(command="env > env.txt")) as fake:
        result = await _run_codex(agents_dir, fake, workspace=workspace, home=home, prompt="env", sink=sink)

    assert result.stop_reason == "end_turn"
    # The command ran (it is reported as completed), without the key in its environment.
    [started] = sink.reported("ToolCallStarted")
    assert [u["status"] for u in sink.reported("ToolCallUpdated")][-1] == "completed"
    environment = (workspace / "env.txt").read_text()
    assert "PATH=" in environment
    assert api_key not in environment and "OPENAI_" not in environment, started


@pytest.mark.asyncio
async def test_codex_reaches_nothing_but_the_model_api(agents_dir: Path, tmp_path: Path) -> None:
    # Every other host it would call (plugin sync from github.com, analytics…) goes through this
    # proxy, which answers nothing: with the kind's config it is never asked.
    proxy_requests: list[bytes] = []

    async def note_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proxy_requests.append(await reader.readline())
        writer.close()

    proxy = await asyncio.start_server(note_request, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    workspace, home = _dirs(tmp_path)
    try:
        with fake_openai_responses(api_key="sk-fake", script=ResponsesScript("a.txt", "a")) as fake:
            result = await _run_codex(agents_dir, fake, workspace=workspace, home=home,
                                      prompt="write a.txt", sink=RecordingSink(), proxy=proxy_url)
    finally:
        proxy.close()

    assert result.stop_reason == "end_turn"
    assert proxy_requests == []
    assert {request.path for request in fake.requests} == {"/v1/responses"}
