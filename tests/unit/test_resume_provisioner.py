"""The provisioner's side of a follow-up after release: a vm_agent that left after its session ended
releases its workspace (WorkspaceReleased) and its agent home is kept for the task's next one; a
failed or cancelled task's kept home and repo credential are deleted."""

from __future__ import annotations

from pathlib import Path

from eventsourcing.persistence import Tracking

from events import TaskFailed, envelope_for
from services.provisioner.domain import Workspace
from services.provisioner.handlers import ProvisionerHandlers
from services.provisioner.local import LocalProvider
from services.provisioner.members import VmAgentProcess
from services.provisioner.watcher import VmAgentWatcher
from services.runtime.repo_url import RepoCredential
from services.runtime.settings import Settings
from tests.unit.fakes import FakePublisher, envelopes_in, popo_store
from vm_agent.domain import Session
from vm_agent.state import open_vm_agent_store

TASK = "t1"


def a_gone_vm_agent(provider: LocalProvider, tmp_path: Path, *, session_ended: bool) -> Path:
    """The state dir of the task's (exited) vm_agent, its store holding a session, and its agent home."""
    home = tmp_path / "pool" / "1" / "home"
    (home / ".agent").mkdir(parents=True)
    (home / ".agent" / "session.jsonl").write_text("turn 1\n")
    state_dir = provider.vm_agent_dir(TASK)
    state_dir.mkdir(parents=True)
    (state_dir / "agent_home").write_text(str(home))
    store = open_vm_agent_store(state_dir)
    session = Session(TASK, f"{TASK}-a1", "shell", None)
    session.started("acp-1")
    if session_ended:
        session.pushed(f"baton/{TASK}", "c1")
    store.save(session)
    store.close()
    return home


def provisioned(store) -> None:
    workspace = Workspace(TASK, "file:///r", None, "local", "cause")
    workspace.ready(workspace_id=f"local-{TASK}", vm_agent_url="nats:x")
    store.save(workspace)


async def test_a_vm_agent_gone_after_its_session_ended_releases_the_workspace_and_its_home_is_kept(tmp_path: Path):
    store, provider = popo_store(), LocalProvider(Settings(data_dir=tmp_path / "data", secret="s"))
    provisioned(store)
    home = a_gone_vm_agent(provider, tmp_path, session_ended=True)

    await VmAgentWatcher(store, provider, FakePublisher()).settle_lost_vm_agent(TASK, 1)

    [released] = [e for e in envelopes_in(store) if e.type == "WorkspaceReleased"]
    assert released.data == {"workspace_id": f"local-{TASK}", "attempt": 1, "reason": released.data["reason"]}
    # The home moved aside, owner-only, for the next vm_agent; the member's is gone.
    kept = provider.saved_agent_home(TASK)
    assert (kept / ".agent" / "session.jsonl").read_text() == "turn 1\n" and not home.exists()
    assert kept.stat().st_mode & 0o777 == 0o700
    # The next vm_agent gets a copy of it in its own home before its workspace is ready.
    member = VmAgentProcess("vm-2", 0, tmp_path / "pool" / "2", "shell")
    (member.state_dir / "home").mkdir(parents=True)
    provider.restore_agent_home(TASK, member)
    assert (member.state_dir / "home" / ".agent" / "session.jsonl").read_text() == "turn 1\n"


async def test_a_vm_agent_lost_mid_run_is_no_release_but_its_home_is_kept_for_the_new_attempt(tmp_path: Path):
    store, provider = popo_store(), LocalProvider(Settings(data_dir=tmp_path / "data", secret="s"))
    provisioned(store)
    a_gone_vm_agent(provider, tmp_path, session_ended=False)

    await VmAgentWatcher(store, provider, FakePublisher()).settle_lost_vm_agent(TASK, 1)

    assert not [e for e in envelopes_in(store) if e.type == "WorkspaceReleased"]
    assert (provider.saved_agent_home(TASK) / ".agent" / "session.jsonl").exists()


async def test_a_failed_task_loses_its_kept_home_and_repo_credential(tmp_path: Path):
    store, provider = popo_store(), LocalProvider(Settings(data_dir=tmp_path / "data", secret="s"))
    handlers = ProvisionerHandlers(store, provider, frozenset())
    provisioned(store)
    a_gone_vm_agent(provider, tmp_path, session_ended=True)
    provider.credentials.seal(TASK, RepoCredential("example.com", "alice", "pw"))
    await VmAgentWatcher(store, provider, FakePublisher()).settle_lost_vm_agent(TASK, 1)
    assert provider.credentials.open(TASK) is not None  # Kept while the task can take a follow-up.

    failed = envelope_for(TaskFailed(reason="no"), task_id=TASK, actor="test")
    await handlers.handlers()[TaskFailed.type](failed, Tracking("provisioner-TaskFailed", 1))

    assert not provider.saved_agent_home(TASK).exists() and provider.credentials.open(TASK) is None
    assert store.get_task_aggregate(Workspace, TASK).task_ended

