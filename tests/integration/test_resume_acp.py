"""Restoring a task's agent session in a new agent process (vm_agent/acp_session.py), against a real
ACP agent (tests/support/scripted_acp_agent.py) in the real sandbox: `session/load` where the agent
keeps the session in its home, a new session saying why where it cannot, and the replayed history
never taken for the new turn's output or its prompt's delivery."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vm_agent.acp_session import AgentProcess, WorkspaceAccess
from vm_agent.sandbox import Sandbox, bwrap_problem
from vm_agent.workspace_files import WorkspaceFiles

SCRIPTED_AGENT = Path(__file__).resolve().parents[1] / "support" / "scripted_acp_agent.py"
TURN_DEADLINE_S = 30.0


class StartSink:
    """A SessionSink keeping how the session started, what was delivered and what was said."""

    def __init__(self) -> None:
        self.started: dict[str, str] = {}
        self.delivered: list[str] = []
        self.outputs: list[str] = []

    async def agent_started(self, session_id: str, **restoration: str) -> None:
        self.started = {"session_id": session_id, **restoration}

    async def prompt_delivered(self, prompt_sha256: str) -> None:
        self.delivered.append(prompt_sha256)

    async def output(self, stream: str, text: str, *, continues: bool = False) -> None:
        self.outputs.append(text)

    async def report(self, event: object) -> None:
        pass


@pytest.fixture
def root() -> Iterator[Path]:
    # Under /var/tmp: the sandbox's own /tmp would hide /tmp.
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="baton-resume-") as directory:
        yield Path(directory)


@pytest.fixture
def sandbox(root: Path) -> Sandbox:
    problem = bwrap_problem()
    if problem is not None:
        pytest.fail(f"the sandbox cannot be tested: {problem} (.ci/bootstrap installs bubblewrap)")
    return Sandbox.from_setting("bwrap", hidden=(root / "data",))


async def one_turn(sandbox: Sandbox, workspace: Path, home: Path, prompt: str,
                   resume_session_id: str | None = None) -> StartSink:
    """A new agent process with `home`, one turn of `prompt` (restoring `resume_session_id`)."""
    workspace.mkdir(parents=True, exist_ok=True)
    launch = sandbox.launch([sys.executable, str(SCRIPTED_AGENT)], workspace=workspace, home=home)
    access = WorkspaceAccess(WorkspaceFiles(workspace, launch.workspace_view or workspace))
    agent = await AgentProcess.start(launch.argv, cwd=launch.cwd, env=launch.env,
                                     session_cwd=launch.workspace_view, offer_workspace=True)
    sink = StartSink()
    try:
        await asyncio.wait_for(agent.run_prompt(cwd=workspace, prompt=prompt, sink=sink, access=access,
                                                resume_session_id=resume_session_id), TURN_DEADLINE_S)
    finally:
        await agent.close()
    return sink


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def test_a_session_kept_in_the_copied_home_is_loaded_and_its_history_is_not_output(
        root: Path, sandbox: Sandbox):
    first = await one_turn(sandbox, root / "w1", root / "home1", "say turn one")
    # The provisioner's copy of the agent home, into the next agent's (another workspace dir too).
    shutil.copytree(root / "home1", root / "home2")
    second = await one_turn(sandbox, root / "w2", root / "home2", "say turn two",
                            resume_session_id=first.started["session_id"])

    assert second.started == {"session_id": first.started["session_id"],
                              "resumed_from": first.started["session_id"], "restored": "loaded"}
    # The replayed history ("earlier: say turn one") is neither output nor the prompt's proof.
    assert second.delivered == [sha256("say turn two")]
    assert "".join(second.outputs) == "turn two\n", second.outputs


async def test_a_session_the_agent_cannot_load_becomes_a_new_one_saying_why(root: Path, sandbox: Sandbox):
    first = await one_turn(sandbox, root / "w1", root / "home1", "say turn one")
    # A fresh home (as a cloud workspace's): the agent has no such session.
    second = await one_turn(sandbox, root / "w2", root / "fresh-home", "say turn two",
                            resume_session_id=first.started["session_id"])

    assert second.started["restored"] == "new" and second.started["resumed_from"] == first.started["session_id"]
    assert second.started["session_id"] != first.started["session_id"]
    assert second.started["restore_note"].startswith("session/load failed"), second.started
    assert second.delivered == [sha256("say turn two")] and "".join(second.outputs) == "turn two\n"


async def test_a_first_session_says_nothing_of_restoring(root: Path, sandbox: Sandbox):
    first = await one_turn(sandbox, root / "w1", root / "home1", "say turn one")
    assert set(first.started) == {"session_id"}
