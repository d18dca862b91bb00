"""Relay backlog: each relaying service's, as `/metrics` gathers it (its own store's for the
gateway, the heartbeats' for the others)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from events import TaskFailed
from services.gateway.routes.metrics import relay_backlogs
from services.runtime.heartbeat import HeartbeatBoard
from services.runtime.relay import Relay
from services.runtime.service import with_relay_backlog
from services.task_runner.domain import Task
from tests.unit.fakes import FakePublisher, popo_store


def relay_with_failed_tasks(count: int) -> Relay:
    store = popo_store()
    relay = Relay(store, FakePublisher())
    for n in range(count):
        task = Task(f"t{n}", "file:///repo", "fix it", "shell", None)
        task.emit(TaskFailed(reason="nope"), actor="tester")
        store.save(task)
    return relay


async def test_a_relays_backlog_is_what_it_recorded_and_has_not_published_and_zero_once_drained():
    relay = relay_with_failed_tasks(2)
    assert relay.backlog() == 4  # two Accepted and two Recorded notifications
    await relay.drain()
    assert relay.backlog() == 0


async def test_heartbeat_details_carry_the_relay_backlog_beside_the_services_own():
    relay = relay_with_failed_tasks(1)
    assert with_relay_backlog(relay, lambda: {"pending": 3})() == {"pending": 3, "relay_backlog": 2}
    await relay.drain()
    assert with_relay_backlog(relay, None)() == {"relay_backlog": 0}


async def test_metrics_report_each_live_services_heartbeat_backlog_and_the_gateways_own():
    heartbeats = HeartbeatBoard(stale_after_s=5)
    now = time.monotonic()
    heartbeats.last_seen = {"task-runner": now, "notifier": now, "monitor": now - 60}
    heartbeats.details = {"task-runner": {"relay_backlog": 4}, "notifier": {"relay_backlog": 0, "pending": 1},
                          "monitor": {"relay_backlog": 9}}
    gateway = SimpleNamespace(heartbeats=heartbeats, relay=relay_with_failed_tasks(1))
    # The monitor has not been heard from lately: its last reading is not reported as current.
    assert relay_backlogs(gateway) == {"task-runner": 4, "notifier": 0, "gateway": 2}
