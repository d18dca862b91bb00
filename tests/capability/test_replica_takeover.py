"""Replicas that hang (SIGSTOP: alive, silent) lose nothing.

- One holding a quiet partition: no event comes to move the partition's pin (the handoff its
  tasks wait for is the one that went missing), so the other replicas learn of the hang from its
  silence on the heartbeat subject and take the partition over: the gap is still named.
- One holding its store's relay lease, which the kernel keeps for as long as the process
  exists: `baton up`'s watchdog kills it (and restarts it), so what the other replica records
  for the task is published and the task completes."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from events import partition_of
from events.flow import DEADLINES
from services.monitor.domain import Watch
from services.runtime.store import ServiceStore, sqlite_env
from services.runtime.watchdog import WatchdogListener
from tests.capability.test_flow_monitor import fast_monitor
from tests.support.api import Api
from tests.support.git_remote import make_origin
from tests.support.processes import BatonStack, NatsServer, stop_soon
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability


def test_a_frozen_monitor_replicas_quiet_partition_is_taken_over_and_the_missing_handoff_named(tmp_path: Path):
    nats = NatsServer(store_dir=tmp_path / "nats", trusting=tmp_path / "baton").start()
    # WorkspaceReady never comes (fault); its deadline is short, every other one long.
    # The watchdog off: this is the heartbeats' doing, and monitor-0 stays frozen past its interval.
    stack = BatonStack(nats=nats, data_dir=tmp_path / "baton", replicas=2, faults="workspace_ready",
                       extra_env={**fast_monitor("WorkspaceReady"), "BATON_WATCHDOG_S": "0"})
    try:
        stack.start()
        api = Api(stack.api, stack.token)
        origin = make_origin(tmp_path).as_uri()
        # monitor-1 is to publish what it records once it takes over: it must hold the relay lease
        # of the monitor's store, which only a dead holder gives up (a frozen one keeps it).
        lease = stack.data_dir / "stores" / "monitor.sqlite.relay-lock"
        wait_for(lambda: _lease_holder(lease) is not None, timeout_s=60, what="a monitor relay to hold the lease")
        if _lease_holder(lease) != stack.service_pid("monitor-1"):
            stack.kill_service("monitor-0")  # Its lease goes with it; monitor-1 takes it.
        wait_for(lambda: _lease_holder(lease) == stack.service_pid("monitor-1"), timeout_s=60,
                 what="monitor-1 to hold the relay lease")
        # Only monitor-0 reads for now: the task's events, and so its partition's pin, go to it.
        with frozen(stack, "monitor-1"):
            task_id = _submit_until_in_a_partition_of(api, origin, replica=0)
            wait_for(lambda: task_id in _watched_by_the_monitor(stack), timeout_s=60,
                     what="monitor-0 to watch the task")
        # monitor-0 hangs (a frozen process, a vanished machine) while it holds the partition,
        # which monitor-0 also prefers. No event comes: the pin times out, and only monitor-0's
        # silence tells monitor-1 to take the quiet partition over.
        with frozen(stack, "monitor-0"):
            events = api.wait_for_end(task_id, timeout_s=120)
        overdue = [e for e in events if e["type"] == "StepOverdue"]
        assert overdue and overdue[0]["data"]["expected"] == "WorkspaceReady", [e["type"] for e in events]
        assert events[-1]["type"] == "TaskFailed" and "WorkspaceReady" in events[-1]["data"]["reason"]
        log = (stack.data_dir / "logs" / "monitor-1.log").read_text()
        assert f"partition {partition_of(task_id)} taken" in log, log[-3000:]
    finally:
        stop_soon(stack, nats)


def test_a_frozen_replica_holding_its_stores_relay_lease_is_killed_and_the_task_completes(tmp_path: Path):
    nats = NatsServer(store_dir=tmp_path / "nats", trusting=tmp_path / "baton").start()
    generous = ",".join(f"{d.expected}=600" for d in DEADLINES)  # Only the watchdog is on trial.
    # baton up run as a systemd unit with WatchdogSec: this test listens where systemd would.
    systemd = WatchdogListener(60.0)
    stack = BatonStack(nats=nats, data_dir=tmp_path / "baton", replicas=2,
                       extra_env={"BATON_DEADLINES": generous, "BATON_WATCHDOG_S": "4", **systemd.env()})
    try:
        stack.start()
        api = Api(stack.api, stack.token)
        lease = stack.data_dir / "stores" / "task-runner.sqlite.relay-lock"
        wait_for(lambda: _lease_holder(lease) is not None, timeout_s=60, what="a task-runner relay to hold the lease")
        [holder] = [name for name in ("task-runner-0", "task-runner-1")
                    if stack.service_pid(name) == _lease_holder(lease)]
        frozen_pid = stack.service_pid(holder)
        with frozen(stack, holder):  # Until the watchdog kills it.
            # Whichever replica's partition the task is in, the other handles it (the frozen one
            # is silent on the heartbeats) and records what it did in the shared store; only the
            # lease holder's relay may publish it.
            task_id = api.submit(repo=make_origin(tmp_path).as_uri(), prompt="echo hi > hi.txt\n",
                                 agent="shell")["task_id"]
            events = api.wait_for_end(task_id, timeout_s=120)
        assert events[-1]["type"] == "TaskCompleted", [e["type"] for e in events]
        said = stack.log_path.read_text()
        assert f"service {holder} (pid {frozen_pid}) sent no watchdog ping" in said, said[-3000:]
        wait_for(lambda: stack.service_pid(holder) != frozen_pid, timeout_s=30, what=f"{holder} restarted")
        assert _lease_holder(lease) != frozen_pid
        # baton up pings systemd's watchdog itself, and keeps it from its services (they ping its own).
        assert set(systemd.senders()) == {stack.process.pid}
    finally:
        systemd.close()
        stop_soon(stack, nats)


@contextmanager
def frozen(stack: BatonStack, service: str) -> Iterator[None]:
    """The service's process stopped (SIGSTOP: alive, silent) for the duration of the block, unless
    the watchdog killed it meanwhile."""
    pid = stack.service_pid(service)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _submit_until_in_a_partition_of(api: Api, origin: str, *, replica: int) -> str:
    """A task whose partition `replica` of two prefers (its id is the gateway's to choose)."""
    for _ in range(32):
        task_id = api.submit(repo=origin, prompt="echo hi\n", agent="shell")["task_id"]
        if partition_of(task_id) % 2 == replica:
            return task_id
    raise AssertionError("32 tasks and none in the partitions of that replica")


def _lease_holder(lease: Path) -> int | None:
    """The pid the relay holding a SQLite store's lease wrote in its lock file."""
    try:
        return int(lease.read_text().strip() or "x")
    except (OSError, ValueError):
        return None


def _watched_by_the_monitor(stack: BatonStack) -> set[str]:
    """The tasks the monitor's store has a watch for (read as an auditor would, never written)."""
    store = ServiceStore("monitor", sqlite_env(stack.data_dir / "stores" / "monitor.sqlite"))
    try:
        topic = f"{Watch.__module__}:{Watch.__qualname__}.Opened"
        notifications = store.process_recorder.select_notifications(0, 10_000, topics=[topic])
        return {store.repository.get(n.originator_id).task_id for n in notifications}
    finally:
        store.close()
