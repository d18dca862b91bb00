"""The warm pool's size follows bursts: as many ready, by kind, as the busiest few seconds of the
last ten minutes took, between its mix and `warm_pool_max`."""

from __future__ import annotations

from pathlib import Path

from services.provisioner.vm_agents import BurstMemory, VmAgentPool
from services.runtime.settings import Settings


def test_a_burst_is_the_most_takes_within_a_few_seconds():
    bursts = BurstMemory()
    for when in (0.0, 0.1, 0.2, 10.0, 10.5, 11.0, 11.5, 12.0, 100.0):
        bursts.took("shell", when)
    assert bursts.peak("shell", 100.0) == 5  # 10.0 … 12.0: five within BURST_S.
    assert bursts.peak("claude", 100.0) == 0
    assert bursts.peak("shell", 12.0 + BurstMemory.REMEMBER_S + 1) == 1  # Only the take at 100 s is remembered.


def test_the_pool_wants_its_mix_raised_to_the_bursts_within_its_maximum(tmp_path: Path, monkeypatch):
    pool = VmAgentPool(Settings(data_dir=tmp_path, warm_pool_max=8), mix={"shell": 3, "claude": 1})
    now = 1000.0
    monkeypatch.setattr("services.provisioner.vm_agents.time.monotonic", lambda: now)
    assert pool._wanted() == {"shell": 3, "claude": 1}
    for _ in range(6):
        pool._bursts.took("shell", now)
    for _ in range(4):
        pool._bursts.took("codex", now)
    # Eight in all: shell grows to its burst (6), codex gets what room is left (2).
    assert pool._wanted() == {"shell": 6, "claude": 1, "codex": 1}
    assert pool.status()["warm_pool_size"] == 8 and pool.status()["warm_pool_min"] == 4
    now += BurstMemory.REMEMBER_S + 10
    assert pool._wanted() == {"shell": 3, "claude": 1}


def test_once_the_burst_is_forgotten_the_pool_stops_its_extra_members(tmp_path: Path, monkeypatch):
    import subprocess

    from services.provisioner.members import VmAgentProcess, process_alive

    pool = VmAgentPool(Settings(data_dir=tmp_path), mix={"shell": 1})
    sleepers = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(3)]
    try:
        pool._ready = [VmAgentProcess(f"vm-{p.pid}", p.pid, tmp_path, "shell") for p in sleepers]
        pool._trim()  # Nothing remembered: the mix (one) is all it keeps.
        assert [m.pid for m in pool._ready] == [sleepers[0].pid]
        for sleeper in sleepers[1:]:
            sleeper.wait(10)
        assert process_alive(sleepers[0].pid)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
