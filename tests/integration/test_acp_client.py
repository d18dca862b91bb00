"""The vm_agent's ACP client against a real ACP agent process (tests/support/scripted_acp_agent.py),
in the real bubblewrap sandbox: every update kind becomes its event, `fs/*` stays in the workspace,
`terminal/*` runs in the agent's sandbox, permissions are answered by the `auto` policy.

The hidden "data dir" lives under /var/tmp (the sandbox's own /tmp would hide /tmp anyway).
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from events import (
    FileDiff,
    FileLocation,
    PermissionAnswered,
    PermissionRequested,
    PlanUpdated,
    ToolCallStarted,
    ToolCallUpdated,
    UsageRecorded,
)
from vm_agent.acp_session import AgentProcess, TurnResult, WorkspaceAccess
from vm_agent.sandbox import WORKSPACE_VIEW, Sandbox, bwrap_problem
from vm_agent.workspace_files import WorkspaceFiles

SCRIPTED_AGENT = Path(__file__).resolve().parents[1] / "support" / "scripted_acp_agent.py"
TURN_DEADLINE_S = 30.0


@dataclass
class Place:
    data_dir: Path
    workspace: Path
    home: Path
    secret: str


@pytest.fixture
def place() -> Iterator[Place]:
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="baton-acp-client-") as root:
        data_dir = Path(root) / "baton"
        workspace, home = data_dir / "workspaces" / "t1", data_dir / "vm_agents" / "t1" / "home"
        workspace.mkdir(parents=True)
        secret = secrets.token_hex(16)
        (data_dir / "secret").write_text(secret)
        yield Place(data_dir, workspace, home, secret)


@pytest.fixture
def sandbox(place: Place) -> Sandbox:
    problem = bwrap_problem()
    if problem is not None:
        pytest.fail(f"the sandbox cannot be tested: {problem} (.ci/bootstrap installs bubblewrap)")
    return Sandbox.from_setting("bwrap", hidden=(place.data_dir,))


class RecordingSink:
    """A SessionSink that keeps every call in order: outputs as (stream, text), events as they are."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    async def agent_started(self, session_id: str) -> None:
        self.calls.append("started")

    async def prompt_delivered(self, prompt_sha256: str) -> None:
        self.calls.append("delivered")

    async def output(self, stream: str, text: str, *, continues: bool = False) -> None:
        self.calls.append((stream, text))

    async def report(self, event: object) -> None:
        self.calls.append(event)

    def events(self, kind: type) -> list:
        return [call for call in self.calls if isinstance(call, kind)]

    def said(self) -> str:
        return "".join(call[1] for call in self.calls if isinstance(call, tuple) and call[0] == "message")


async def run_script(script: str, place: Place, sandbox: Sandbox) -> tuple[RecordingSink, TurnResult]:
    """One turn of the scripted agent in `sandbox`, served as the vm_agent serves a real agent."""
    def in_sandbox(argv):
        return sandbox.launch(argv, workspace=place.workspace, home=place.home)

    launch = in_sandbox([sys.executable, str(SCRIPTED_AGENT)])
    access = WorkspaceAccess(WorkspaceFiles(place.workspace, launch.workspace_view or place.workspace), in_sandbox)
    sink = RecordingSink()
    agent = await AgentProcess.start(launch.argv, cwd=launch.cwd, env=launch.env,
                                     session_cwd=launch.workspace_view, offer_workspace=True)
    try:
        result = await asyncio.wait_for(
            agent.run_prompt(cwd=place.workspace, prompt=script, sink=sink, access=access), TURN_DEADLINE_S)
    finally:
        await agent.close()
    return sink, result


def test_every_update_kind_of_a_turn_becomes_its_event_in_order(place: Place, sandbox: Sandbox):
    script = "\n".join([
        "think Let me look around",
        "plan Read the code | Write hello.txt",
        "say I will write hello.txt now",
        "write hello.txt Hello\\nWorld",
        "run cat hello.txt",
        "usage 1200 200000 0.0123",
        "commands",
        "say Done",
        "tokens 1000 234",
    ])
    sink, result = asyncio.run(run_script(script, place, sandbox))

    assert result.stop_reason == "end_turn"
    # The file was written through fs/write_text_file, into the workspace.
    assert (place.workspace / "hello.txt").read_text() == "Hello\nWorld"
    # Thought and message chunks are lines on their streams; the two chunks of a line are one.
    assert sink.calls[:4] == ["started", "delivered", ("thought", "Let me look around\n"), sink.calls[3]]
    assert sink.calls[3] == PlanUpdated(entries=(
        {"content": "Read the code", "status": "in_progress", "priority": "medium"},
        {"content": "Write hello.txt", "status": "pending", "priority": "medium"}))
    assert sink.calls[4] == ("message", "I will write hello.txt now\n")
    # The edit: started, permission asked and answered allow_once by the policy, then its diff.
    write, run = sink.events(ToolCallStarted)
    assert (write.tool_call_id, write.kind, write.status, write.title) == ("call-1", "edit", "pending", "Write hello.txt")
    assert write.locations == (FileLocation(path="hello.txt"),)
    asked = sink.events(PermissionRequested)
    assert [(a.request_id, a.tool_call_id) for a in asked] == [("1", "call-1"), ("2", "call-2")]
    assert [o.kind for o in asked[0].options] == ["allow_always", "allow_once", "reject_once"]
    answers = sink.events(PermissionAnswered)
    assert answers == [PermissionAnswered(request_id=r, option_id="once", outcome="selected", by="policy:auto")
                       for r in ("1", "2")]
    write_done, run_done = sink.events(ToolCallUpdated)
    assert write_done.status == "completed" and not write_done.truncated
    assert write_done.diffs == (FileDiff(path="hello.txt", old_text=None, new_text="Hello\nWorld"),)
    assert sink.calls.index(asked[0]) < sink.calls.index(answers[0]) < sink.calls.index(write_done)
    # The command ran in a terminal; its output is the tool call's.
    assert (run.kind, run_done.status, run_done.output) == ("execute", "completed", "Hello\nWorld")
    # Usage: the context window and cost from usage_update, the turn's tokens from the response.
    assert sink.events(UsageRecorded) == [
        UsageRecorded(source="usage_update", context_used=1200, context_size=200000, cost_amount=0.0123,
                      cost_currency="USD"),
        UsageRecorded(source="prompt_response", input_tokens=1000, output_tokens=234, total_tokens=1234)]
    assert sink.calls[-2:] == [("message", "Done\n"), sink.events(UsageRecorded)[-1]]
    # available_commands_update is no event and no error.
    assert "run exited with 0: Hello\n" in sink.said()


def test_fs_requests_cannot_leave_the_workspace(place: Place, sandbox: Sandbox):
    # Symlinks the agent could have made, leading out of its workspace to the data dir.
    (place.workspace / "to-data").symlink_to(place.data_dir)
    (place.workspace / "secret-link").symlink_to(place.data_dir / "secret")
    (place.workspace / "notes.txt").write_text("one\ntwo\nthree\nfour\n")
    (place.workspace / "notes-link").symlink_to("notes.txt")  # Inside: fine.
    outside = place.data_dir / "escaped.txt"
    script = "\n".join([
        f"read {place.data_dir}/secret",
        "read /workspace/../secret",
        "read secret-link",
        "read to-data/secret",
        "read /etc/hostname",
        "write ../escaped.txt x",
        f"write {outside} x",
        "write to-data/escaped.txt x",
        "write /tmp/escaped.txt x",
        "read notes-link",
        "write sub/dir/ok.txt fine",
    ])
    sink, _ = asyncio.run(run_script(script, place, sandbox))

    said = sink.said()
    assert place.secret not in said
    for path in (f"{place.data_dir}/secret", "/workspace/../secret", "secret-link", "to-data/secret", "/etc/hostname"):
        assert f"read {path}: error: " in said, said
    for path in ("../escaped.txt", str(outside), "to-data/escaped.txt", "/tmp/escaped.txt"):
        assert f"write {path}: refused: " in said, said
    assert "outside the workspace" in said and "'..'" in said
    assert not outside.exists() and not Path("/tmp/escaped.txt").exists()
    # Inside the workspace, symlinks and new directories are fine.
    assert "read notes-link: one\ntwo\nthree\nfour\n" in said
    assert (place.workspace / "sub" / "dir" / "ok.txt").read_text() == "fine"


def test_terminals_run_in_the_agents_sandbox(place: Place, sandbox: Sandbox):
    sink, _ = asyncio.run(run_script(f"run pwd; cat {place.data_dir}/secret", place, sandbox))

    (run_done,) = sink.events(ToolCallUpdated)
    assert run_done.status == "failed"
    assert run_done.output.splitlines()[0] == str(WORKSPACE_VIEW)
    assert f"{place.data_dir}/secret: No such file or directory" in run_done.output
    assert place.secret not in run_done.output + sink.said()
