"""Gemini CLI (`gemini --acp`, the pinned adapter) does a turn through the vm_agent's own ACP client,
offline, against a scripted Gemini API (tests/support/fake_gemini.py).

The agent is started as Baton starts it: its kind's command, its declared environment, its fixed
variables and its `prepare` hook (settings in a private home), so every quirk Baton handles for
Gemini CLI is handled here too, and nothing else is. Every wait is bounded by a deadline.
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

from events import PermissionAnswered, PermissionRequested, ToolCallStarted, ToolCallUpdated, UsageRecorded
from tests.support.fake_gemini import FINAL_TEXT, THOUGHT_TEXT, FakeGemini, running_fake_gemini
from vm_agent.acp_session import AgentProcess, TurnResult, WorkspaceAccess
from vm_agent.backends import AGENT_KINDS
from vm_agent.sandbox import agent_environment
from vm_agent.workspace_files import WorkspaceFiles

GEMINI = AGENT_KINDS["gemini"]
TURN_DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def agents_dir(installed_agents: Callable[..., Path]) -> Path:
    """The machine-wide agents dir with Gemini CLI's pinned adapter in it (installed once)."""
    return installed_agents("gemini")


class RecordingSink:
    """SessionSink that records every call in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def agent_started(self, session_id: str) -> None:
        self.calls.append(("started", session_id))

    async def prompt_delivered(self, prompt_sha256: str) -> None:
        self.calls.append(("delivered", prompt_sha256))

    async def output(self, stream: str, text: str, *, continues: bool = False) -> None:
        self.calls.append(("output", (stream, text)))

    async def report(self, event: object) -> None:
        self.calls.append(("report", event))

    def text(self, stream: str) -> str:
        """All the output of `stream`, joined."""
        outputs = [output for name, output in self.calls if name == "output"]
        return "".join(text for of, text in outputs if of == stream)  # type: ignore[misc]

    def reports(self, kind: type) -> list:
        """The events of type `kind` the turn reported, in order."""
        return [event for name, event in self.calls if name == "report" and isinstance(event, kind)]


async def _run_turn(fake: FakeGemini, *, workspace: Path, home: Path, agents_dir: Path, prompt: str,
                    sink: RecordingSink, environ: dict[str, str]) -> TurnResult:
    """One prompt turn of Gemini CLI started as the vm_agent starts it (its kind's command,
    environment and `prepare`; the client's `fs/*` offered as the kind says), unsandboxed: the
    sandbox has its own tests."""
    home.mkdir(mode=0o700)
    env = GEMINI.environment(home, {**agent_environment(environ, GEMINI.env), "HOME": str(home)})
    agent = await AgentProcess.start(GEMINI.command_in(agents_dir), cwd=workspace, env=env,
                                     offer_workspace=True, offer_reads=GEMINI.reads_through_client)
    try:
        access = WorkspaceAccess(WorkspaceFiles(workspace, workspace))
        return await asyncio.wait_for(agent.run_prompt(cwd=workspace, prompt=prompt, sink=sink, access=access),
                                      timeout=TURN_DEADLINE_S)
    finally:
        await agent.close()


@pytest.mark.asyncio
async def test_gemini_writes_the_file_the_model_asked_for_and_reports_its_turn(tmp_path: Path, agents_dir: Path) -> None:
    nonce = secrets.token_hex(8)
    api_key = f"gemini-test-key-{secrets.token_hex(8)}"
    prompt = f"Write the file hello.txt saying hello. Nonce: {nonce}"
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    sink = RecordingSink()

    with running_fake_gemini(api_key=api_key, file_path="hello.txt", file_content=f"hello {nonce}\n") as fake:
        environ = {"PATH": os.environ["PATH"], "GEMINI_API_KEY": api_key, "GOOGLE_GEMINI_BASE_URL": fake.url,
                   "BATON_DATA_DIR": str(tmp_path / "data"), "UNRELATED_SECRET": "not-for-agents"}
        result = await _run_turn(fake, workspace=workspace, home=tmp_path / "home", agents_dir=agents_dir,
                                 prompt=prompt, sink=sink, environ=environ)

    assert result.stop_reason == "end_turn", sink.calls
    # The agent opened its session, then accepted exactly the prompt we sent.
    assert [name for name, _ in sink.calls[:2]] == ["started", "delivered"], sink.calls
    assert sink.calls[1][1] == hashlib.sha256(prompt.encode()).hexdigest()
    # The prompt reached the model, with the key in Gemini's own header, and only with it.
    assert fake.saw(nonce), [r.path for r in fake.requests]
    assert fake.turn_requests() and all(r.api_key == api_key for r in fake.requests)
    # The model's function call wrote the file in the workspace (permission answered: allow once).
    assert (workspace / "hello.txt").read_text() == f"hello {nonce}\n"
    _assert_permission_allowed_once(sink)
    _assert_tool_call_completed_with_its_diff(sink, f"hello {nonce}\n")
    # What the model thought and said came as the agent's thought and message streams.
    assert THOUGHT_TEXT in sink.text("thought")
    assert sink.text("message").endswith(FINAL_TEXT)
    _assert_usage_is_the_fakes(sink, fake)
    # Settings Baton wrote: no telemetry, the API-key login; the key itself is in no file of its home.
    settings = json.loads((tmp_path / "home" / ".gemini" / "settings.json").read_text())
    assert settings["security"]["auth"]["selectedType"] == "gemini-api-key"
    assert settings["privacy"]["usageStatisticsEnabled"] is False
    assert not _files_containing(tmp_path / "home", api_key)


def _assert_permission_allowed_once(sink: RecordingSink) -> None:
    requested, answered = sink.reports(PermissionRequested), sink.reports(PermissionAnswered)
    assert len(requested) == 1 and len(answered) == 1, sink.calls
    chosen = {option.option_id: option.kind for option in requested[0].options}[answered[0].option_id]
    assert (answered[0].outcome, chosen, answered[0].by) == ("selected", "allow_once", "policy:auto")


def _assert_tool_call_completed_with_its_diff(sink: RecordingSink, content: str) -> None:
    """Gemini CLI sends no `tool_call` for a call it asks permission for: the request names the
    call, then `tool_call_update` says it completed, with its kind and the diff it made."""
    call_id = sink.reports(PermissionRequested)[0].tool_call_id
    assert all(start.tool_call_id == call_id for start in sink.reports(ToolCallStarted))
    updates = [update for update in sink.reports(ToolCallUpdated) if update.tool_call_id == call_id]
    assert updates and (updates[-1].status, updates[-1].kind) == ("completed", "edit"), sink.calls
    diffs = [diff for update in updates for diff in update.diffs]
    assert any(diff.path == "hello.txt" and diff.new_text == content for diff in diffs), diffs


def _assert_usage_is_the_fakes(sink: RecordingSink, fake: FakeGemini) -> None:
    """Gemini CLI adds up the model calls of its turn and says so in the response's `_meta.quota`."""
    usage = sink.reports(UsageRecorded)
    assert usage, sink.calls
    last = usage[-1]
    calls = fake.replies_with_usage
    assert (last.input_tokens, last.output_tokens) == (calls * fake.usage.prompt_tokens,
                                                       calls * fake.usage.candidates_tokens), usage


def _files_containing(root: Path, text: str) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file() and text.encode() in path.read_bytes()]
