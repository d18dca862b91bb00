"""Provisioner replicas: each judges only the vm_agents started on its own machine (pid namespace),
and two on one machine take turns settling a lost one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from services.provisioner.local import LocalProvider
from services.provisioner.members import this_machine
from services.provisioner.watcher import VmAgentWatcher, _alone_in
from services.runtime.settings import Settings
from tests.unit.fakes import FakePublisher, popo_store

TASK = "t1"


def watcher_with_vm_agent(tmp_path: Path, *, pid: int | None, machine: str | None) -> VmAgentWatcher:
    provider = LocalProvider(Settings(data_dir=tmp_path / "data", secret="s"))
    if pid is not None:
        state_dir = provider.vm_agent_dir(TASK)
        state_dir.mkdir(parents=True)
        (state_dir / "pid").write_text(str(pid))
        if machine is not None:
            (state_dir / "machine").write_text(machine)
    return VmAgentWatcher(popo_store(), provider, FakePublisher())


def a_dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_a_vm_agent_started_here_is_lost_once_its_process_is_gone(tmp_path: Path):
    assert watcher_with_vm_agent(tmp_path / "a", pid=a_dead_pid(), machine=this_machine())._lost_here(TASK, 1)
    assert not watcher_with_vm_agent(tmp_path / "b", pid=os.getpid(), machine=this_machine())._lost_here(TASK, 1)
    # Recorded before machines were: this machine's, as it always was.
    assert watcher_with_vm_agent(tmp_path / "c", pid=a_dead_pid(), machine=None)._lost_here(TASK, 1)


def test_a_vm_agent_of_another_machine_is_never_judged_lost_here(tmp_path: Path):
    # Its pid means nothing in this namespace (another container sharing the data dir)…
    other = watcher_with_vm_agent(tmp_path / "a", pid=a_dead_pid(), machine="another-boot/4026531836")
    assert not other._lost_here(TASK, 1)
    # …and on another machine its state dir is not here at all.
    assert not watcher_with_vm_agent(tmp_path / "b", pid=None, machine=None)._lost_here(TASK, 1)


def test_two_replicas_on_one_machine_take_turns_settling_a_vm_agent(tmp_path: Path):
    with _alone_in(tmp_path) as first:
        with _alone_in(tmp_path) as second:
            assert (first, second) == (True, False)
    with _alone_in(tmp_path) as later:
        assert later
