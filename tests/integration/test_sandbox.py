"""The agent sandbox (`vm_agent/sandbox.py`) with the real bwrap and the real shell agent.

The hidden "data dir" lives under /var/tmp, not /tmp: the sandbox's own /tmp would hide anything
under /tmp anyway, and a real data dir (`~/.baton`) is not there either.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.provisioner.local import move_clone_into
from vm_agent.acp_session import AgentStartError
from vm_agent.backends import BACKENDS
from vm_agent.runner import AgentLauncher
from vm_agent.sandbox import HOME_VIEW, WORKSPACE_VIEW, Sandbox, bwrap_problem
from vm_agent.state import directory_identity
from tests.support.waiting import wait_for

DEADLINE_S = 30.0


@dataclass
class Place:
    data_dir: Path
    workspace: Path
    home: Path
    secret: str


@pytest.fixture
def place() -> Iterator[Place]:
    """A data dir holding a secret, an empty workspace and a home inside it (as a pool member's)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="baton-sandbox-") as root:
        data_dir = Path(root) / "baton"
        workspace, home = data_dir / "workspaces" / ".pool" / "1", data_dir / "vm_agents" / "pool" / "1" / "home"
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


def run_in(sandbox: Sandbox, place: Place, script: str, **launch: object) -> subprocess.CompletedProcess[str]:
    command = sandbox.launch(["bash", "-c", script], workspace=place.workspace, home=place.home, **launch)
    return subprocess.run(command.argv, env=command.env, cwd=command.cwd, capture_output=True, text=True,
                          timeout=DEADLINE_S, stdin=subprocess.DEVNULL)


def test_the_agent_writes_its_workspace_and_home_and_nothing_else(sandbox: Sandbox, place: Place):
    done = run_in(sandbox, place, 'pwd; echo work > made.txt; echo cfg > "$HOME/.agentrc"; '
                                  "touch /usr/x 2>&1; touch /new 2>&1; echo scratch > /tmp/scratch && echo tmp-ok")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == str(WORKSPACE_VIEW)
    assert (place.workspace / "made.txt").read_text() == "work\n"
    assert (place.home / ".agentrc").read_text() == "cfg\n"
    # The system is read-only, /tmp its own.
    assert "touch: cannot touch '/usr/x': Read-only file system" in done.stdout
    assert "touch: cannot touch '/new': Read-only file system" in done.stdout
    assert "tmp-ok" in done.stdout and not Path("/tmp/scratch").exists()


def test_the_data_dir_and_the_hosts_processes_are_out_of_sight(sandbox: Sandbox, place: Place):
    done = run_in(sandbox, place, f"cat {place.data_dir}/secret; ls -A {place.data_dir}; echo listed; "
                                  f"umount {place.data_dir} 2>&1; cat {place.data_dir}/secret; "
                                  "ls /proc | grep -c '^[0-9]'")
    assert place.secret not in done.stdout + done.stderr
    assert f"cat: {place.data_dir}/secret: No such file or directory" in done.stderr
    assert done.stdout.splitlines()[0] == "listed", "the data dir looks empty"
    assert "must be superuser" in done.stdout, "no capability to unmount what hides it"
    # Only the sandbox's own processes (bwrap's init, bash, ls, grep): not the vm_agent's environ.
    assert int(done.stdout.split()[-1]) <= 5, done.stdout


def test_the_user_s_own_keys_and_tokens_are_out_of_sight(
    sandbox: Sandbox, place: Place, monkeypatch: pytest.MonkeyPatch
):
    # A home with an ssh key and a .netrc, as the user running Baton has.
    user_home = place.data_dir.parent / "user-home"
    (user_home / ".ssh").mkdir(parents=True)
    (user_home / ".ssh" / "id_ed25519").write_text("PRIVATE-KEY")
    (user_home / ".netrc").write_text("machine github.com password NETRC-TOKEN")
    (user_home / "notes.txt").write_text("readable")
    monkeypatch.setenv("HOME", str(user_home))
    done = run_in(sandbox, place, f"cat {user_home}/.ssh/id_ed25519 {user_home}/.netrc {user_home}/notes.txt")
    assert "PRIVATE-KEY" not in done.stdout + done.stderr and "NETRC-TOKEN" not in done.stdout
    assert f"{user_home}/.ssh/id_ed25519: No such file or directory" in done.stderr
    assert "readable" in done.stdout, "the rest of the system stays readable"


def test_the_environment_is_the_allowlist_plus_what_the_agent_declares(
    sandbox: Sandbox, place: Place, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("BATON_VM_AGENT_TOKEN", "t0ken")
    monkeypatch.setenv("BATON_DATA_DIR", str(place.data_dir))
    monkeypatch.setenv("BATON_SUPERVISOR_PID", "1")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-declared")
    monkeypatch.setenv("SOME_OTHER_SECRET", "undeclared")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    command = sandbox.launch(["env"], workspace=place.workspace, home=place.home, env_names=BACKENDS["claude"].env)
    # The bwrap process keeps only the marks by which `baton up` finds what to stop…
    assert {name for name in command.env if name.startswith("BATON_")} == {"BATON_DATA_DIR", "BATON_SUPERVISOR_PID"}
    done = subprocess.run(command.argv, env=command.env, cwd=command.cwd, capture_output=True, text=True,
                          timeout=DEADLINE_S)
    seen = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    # …and the agent inside has none of them.
    assert not [name for name in seen if name.startswith("BATON_")], seen
    assert seen["ANTHROPIC_API_KEY"] == "sk-declared" and seen["LC_ALL"] == "C.UTF-8"
    assert "SOME_OTHER_SECRET" not in seen
    assert seen["HOME"] == str(HOME_VIEW)


def test_the_agents_dir_is_readable_in_the_sandbox_even_inside_the_data_dir(place: Place):
    # The default agents dir is `<data dir>/agents`: its adapters run (with node), read-only.
    agents_dir = place.data_dir / "agents"
    adapter = agents_dir / "claude-0.101.0" / "node_modules" / ".bin" / "claude-agent-acp"
    adapter.parent.mkdir(parents=True)
    adapter.write_text('#!/usr/bin/env node\nconsole.log("adapter ran on node " + process.version)\n')
    adapter.chmod(0o755)
    sandbox = Sandbox.from_setting("bwrap", hidden=(place.data_dir,), readable=(agents_dir,))
    command = BACKENDS["claude"].command_in(agents_dir)
    done = run_in(sandbox, place, f"{command[0]}; touch {agents_dir}/x 2>&1; cat {place.data_dir}/secret")
    assert "adapter ran on node v" in done.stdout, done.stdout + done.stderr
    assert "Read-only file system" in done.stdout
    assert place.secret not in done.stdout, "the rest of the data dir stays hidden"


class StdoutSink:
    """Keeps what the agent printed on stdout."""

    def __init__(self) -> None:
        self.stdout = ""

    async def agent_started(self, session_id: str) -> None:
        pass

    async def prompt_delivered(self, prompt_sha256: str) -> None:
        pass

    async def output(self, stream: str, text: str, *, continues: bool = False) -> None:
        if stream == "stdout":
            self.stdout += text


def test_a_warm_agent_works_in_the_clone_moved_into_its_directory(sandbox: Sandbox, place: Place):
    """The warm pool's case: the agent starts on an empty directory before the task is known."""
    async def scenario() -> None:
        launcher = AgentLauncher(sandbox, home=place.home, agents_dir=place.home)
        agent = await asyncio.wait_for(launcher.start(BACKENDS["shell"], workspace=place.workspace), DEADLINE_S)
        try:
            # Meanwhile the clone was made elsewhere; it moves in, the directory takes its path.
            clone = place.data_dir / "workspaces" / "task-1"
            clone.mkdir()
            (clone / "README.md").write_text("the clone\n")
            identity = directory_identity(place.workspace)
            move_clone_into(place.workspace, clone=clone)
            assert directory_identity(clone) == identity and not place.workspace.exists()

            sink = StdoutSink()
            result = await asyncio.wait_for(
                agent.run_prompt(cwd=clone, prompt="cat README.md; echo done > out.txt", sink=sink), DEADLINE_S)
        finally:
            await agent.close()
        assert result.stop_reason == "end_turn", sink.stdout
        assert sink.stdout == "the clone\n"
        assert (clone / "out.txt").read_text() == "done\n"

    asyncio.run(scenario())


def test_stopping_the_sandbox_ends_every_process_in_it(sandbox: Sandbox, place: Place):
    marker = f"{secrets.randbelow(10**6) + 10**6}"
    command = sandbox.launch(["bash", "-c", f"sleep {marker} & sleep {marker} & echo up; wait"],
                             workspace=place.workspace, home=place.home)
    process = subprocess.Popen(command.argv, env=command.env, cwd=command.cwd, stdout=subprocess.PIPE,
                               start_new_session=True)  # As the vm_agent starts its agent.
    try:
        assert process.stdout is not None and process.stdout.readline() == b"up\n"
        wait_for(lambda: len(sleepers(marker)) == 2, timeout_s=DEADLINE_S, what="both sleepers to run")
        os.killpg(process.pid, signal.SIGTERM)  # What the vm_agent does to stop its agent.
        process.wait(DEADLINE_S)
        wait_for(lambda: not sleepers(marker), timeout_s=DEADLINE_S, what="the sandbox's processes to end")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def sleepers(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == f"sleep\0{marker}\0".encode():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_a_required_sandbox_that_cannot_be_made_refuses_the_agent_with_a_reason(place: Place):
    required = Sandbox("unavailable", (place.data_dir,), problem="bwrap is not installed")
    assert required.describe().startswith("required but unavailable")
    launcher = AgentLauncher(required, home=place.home, agents_dir=place.home)
    shell = BACKENDS["shell"]
    with pytest.raises(AgentStartError) as refused:
        asyncio.run(launcher.start(shell, workspace=place.workspace))
    assert "BATON_SANDBOX=bwrap" in str(refused.value) and "bwrap is not installed" in str(refused.value)


def test_without_a_sandbox_agents_are_said_to_read_the_data_dir(place: Place):
    none = Sandbox.from_setting("none", hidden=(place.data_dir,))
    assert none.describe() == "none — agents can read the data dir (BATON_SANDBOX=none)"
    command = none.launch(["true"], workspace=place.workspace, home=place.home)
    assert command.argv == ("true",) and command.workspace_view is None
