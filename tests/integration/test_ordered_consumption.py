"""AgentOutput floods while the handoffs of many tasks interleave, read by the real monitor and the
real task board through their partitioned consumers, two replicas of each sharing their stores, one
killed mid-flood: the monitor names no gap, every task is completed on the board, and each handler
saw each task's events in stream order (the issue's consumer-level test, against nats-server)."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
from eventsourcing.persistence import Tracking

from events import (
    DEADLINES,
    AgentFinished,
    AgentOutput,
    AgentSessionStarted,
    BranchPushed,
    Deadline,
    Envelope,
    PromptDelivered,
    TaskCompleted,
    TaskSubmitted,
    WorkspaceReady,
    WorkspaceRequested,
    envelope_for,
    partition_of,
)
from projections.audit_log import AuditLog
from projections.sql import SQLiteDatabase
from projections.task_board import PROJECTED_TYPES, STATE_OF, TaskBoard
from services.monitor.domain import Watch
from services.monitor.handlers import Monitor
from services.projector.handlers import Projector
from services.runtime.bus import Bus
from services.runtime.consumer import BatchHandler, Handler, Subscription, run_all
from services.runtime.partitions import HeldPartitions, consume
from services.runtime.store import ServiceStore, envelope_of, sqlite_env
from tests.support.processes import NatsServer

TASKS = 30
OUTPUT_LINES = 200
"""Per task: 6,000 AgentOutput in all, around 240 handoffs."""
PUBLISH_BATCH = 100
KILL_AFTER_BATCHES = 15
GENEROUS = tuple(Deadline(d.expected, d.after, 600) for d in DEADLINES)
"""No deadline passes during the test: a gap the monitor names can only come from the order it
folded the events in (a handoff seen before the one the flow puts ahead of it)."""


def flow_of(task_id: str, lines: int) -> Iterator[Envelope]:
    """The task's handoffs in the flow contract's order, its output between; each envelope is made
    when asked for (its `occurred_at` is when it is published, as a real producer's would be)."""
    branch, commit = f"baton/{task_id}", secrets.token_hex(20)
    head = [TaskSubmitted(repo="file:///r.git", prompt="p", agent="shell"),
            WorkspaceRequested(repo="file:///r.git", agent="shell"),
            WorkspaceReady(workspace_id=task_id, provider="local", vm_agent_url="http://127.0.0.1:1"),
            AgentSessionStarted(session_id="s", agent="shell", attempt_id="a"),
            PromptDelivered(session_id="s", prompt_sha256="0" * 64)]
    for event in head:
        yield envelope_for(event, task_id=task_id, actor="test")
    for seq in range(1, lines + 1):
        yield envelope_for(AgentOutput(seq=seq, stream="stdout", text=f"line {seq}\n"),
                           task_id=task_id, actor="agent:shell")
    for event in (AgentFinished(stop_reason="end_turn"), BranchPushed(branch=branch, commit=commit),
                  TaskCompleted(branch=branch, commit=commit)):
        yield envelope_for(event, task_id=task_id, actor="test")


@dataclass
class Handled:
    """What every handler was given, in the order it was given it (one event loop: a real order)."""

    by_service: dict[str, list[tuple[str, int, int]]] = field(default_factory=lambda: defaultdict(list))
    board_surprises: list[str] = field(default_factory=list)

    def note(self, service: str, replica: int, items: list[tuple[Envelope, Tracking]]) -> None:
        self.by_service[service] += [(e.task_id, t.notification_id, replica) for e, t in items]

    def wrap(self, service: str, replica: int, handle: Handler) -> Handler:
        async def handle_and_note(envelope: Envelope, tracking: Tracking) -> None:
            await handle(envelope, tracking)
            self.note(service, replica, [(envelope, tracking)])

        return handle_and_note

    def wrap_batch(self, service: str, replica: int, handle_batch: BatchHandler) -> BatchHandler:
        async def handle_batch_and_note(items: list[tuple[Envelope, Tracking]]) -> None:
            await handle_batch(items)
            self.note(service, replica, items)

        return handle_batch_and_note

    def check_board(self, board: TaskBoard, items: list[tuple[Envelope, Tracking]]) -> None:
        """Each task's row says what its latest event folded says (the flow's states only go
        forward, so any other state is an event folded out of order)."""
        latest = {envelope.task_id: envelope for envelope, _ in items}
        for task_id, envelope in latest.items():
            row = board.get(task_id) or {}
            if (row.get("state"), row.get("last_event")) != (STATE_OF.get(envelope.type), envelope.type):
                self.board_surprises.append(f"{task_id} after {envelope.type}: {row.get('state')}, "
                                            f"last {row.get('last_event')}")


@dataclass
class Replica:
    """One replica of the monitor and one of the projector's board, on their own connection."""

    index: int
    nc: nats.NATS
    running: asyncio.Task[None]
    held: HeldPartitions

    async def kill(self) -> None:
        if self.nc.is_closed:
            return
        self.running.cancel()
        await asyncio.gather(self.running, return_exceptions=True)
        await self.nc.close()


async def start_replica(url: str, index: int, stores: Path, handled: Handled) -> Replica:
    nc = await nats.connect(url, name=f"replica-{index}")
    bus = Bus(nc=nc, js=nc.jetstream())
    monitor_store = ServiceStore("monitor", sqlite_env(stores / "monitor.sqlite"))
    replica = (index, 2)
    held = HeldPartitions(replica)  # As services/monitor/main.py wires it.
    monitor = Monitor(monitor_store, GENEROUS, stall_after_s=600, held=held)
    monitor.resume()
    board = TaskBoard(SQLiteDatabase(stores / "task_board.sqlite"))
    projector = Projector(board, AuditLog(SQLiteDatabase(stores / "audit_log.sqlite")))
    watch_batch = handled.wrap_batch("monitor", index, monitor.on_batch)

    async def project_and_check(items: list[tuple[Envelope, Tracking]]) -> None:
        await projector.project_batch(items)
        handled.check_board(board, items)

    project_batch = handled.wrap_batch("projector", index, project_and_check)

    async def project_one(envelope: Envelope, tracking: Tracking) -> None:
        await project_and_check([(envelope, tracking)])

    project_one_noted = handled.wrap("projector", index, project_one)
    running = asyncio.create_task(run_all(
        consume(bus, service="monitor", store=monitor_store, replica=replica, held_partitions=held, subscription=[
            Subscription(t, handled.wrap("monitor", index, h), watch_batch) for t, h in monitor.handlers().items()]),
        monitor.run_ticks(),
        consume(bus, service="projector", store=board, replica=replica, subscription=[
            Subscription(t, project_one_noted, project_batch) for t in projector.board_handlers()]),
    ))
    return Replica(index, nc, running, held)


async def publish_interleaved(bus: Bus, tasks: list[str], *, on_batch: dict[int, asyncio.Event]) -> list[Envelope]:
    """Every task's flow, interleaved: a task joins the flood each batch, and each message goes to
    a task chosen at random among those started; paced, so the consumers read while it runs."""
    rng = random.Random(16)
    waiting = list(tasks)
    flows: dict[str, Iterator[Envelope]] = {}
    published: list[Envelope] = []
    batch_no = 0
    while waiting or flows:
        if waiting:
            task_id = waiting.pop(0)
            flows[task_id] = flow_of(task_id, OUTPUT_LINES)
        batch: list[Envelope] = []
        while flows and len(batch) < PUBLISH_BATCH:
            task_id = rng.choice(list(flows))
            envelope = next(flows[task_id], None)
            if envelope is None:
                del flows[task_id]
            else:
                batch.append(envelope)
        await bus.publish_batch(batch)
        published += batch
        batch_no += 1
        if batch_no in on_batch:
            on_batch[batch_no].set()
        await asyncio.sleep(0.1)  # Pacing: the flood lasts while the replicas read (and one dies).
    return published


async def wait_until_handled(handled: Handled, expected: dict[str, int], *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(len({(t, s) for t, s, _ in handled.by_service[service]}) < n for service, n in expected.items()):
        if time.monotonic() > deadline:
            got = {service: len(handled.by_service[service]) for service in expected}
            raise AssertionError(f"not every event was handled in {timeout_s} s: {got} of {expected}")
        await asyncio.sleep(0.2)


def out_of_order(handled: list[tuple[str, int, int]]) -> list[str]:
    """Each task's events as a service handled them, across replicas: strictly rising stream
    sequences (no event twice, none before an earlier one)."""
    last: dict[str, int] = {}
    found = []
    for task_id, seq, replica in handled:
        if seq <= last.get(task_id, 0):
            found.append(f"{task_id}: seq {seq} (replica {replica}) after {last[task_id]}")
        last[task_id] = max(seq, last.get(task_id, 0))
    return found


def recorded_by(store: ServiceStore) -> list[Envelope]:
    """The envelopes the monitor recorded (what its relay would publish), in order."""
    found, start = [], 0
    while notifications := store.process_recorder.select_notifications(start, 1000, inclusive_of_start=False):
        found += [e for n in notifications if (e := envelope_of(store.mapper.to_domain_event(n))) is not None]
        start = notifications[-1].id
    return found


async def test_a_flood_of_output_among_interleaved_handoffs_reaches_each_replica_in_order(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
):
    tasks = [secrets.token_hex(8) for _ in range(TASKS)]
    handled = Handled()
    replicas = [await start_replica(nats_server.url, i, tmp_path, handled) for i in range(2)]
    kill_now = asyncio.Event()
    publishing = asyncio.create_task(publish_interleaved(bus, tasks, on_batch={KILL_AFTER_BATCHES: kill_now}))
    try:
        # Mid-flood, replica 0 dies: its partitions (and what it held unacknowledged) move to replica 1.
        await asyncio.wait_for(kill_now.wait(), 60)
        await replicas[0].kill()
        killed_at = len(handled.by_service["monitor"])
        published = await publishing
        expected = {"monitor": len(published),
                    "projector": sum(1 for e in published if e.type in PROJECTED_TYPES)}
        await wait_until_handled(handled, expected, timeout_s=45)
    finally:
        publishing.cancel()
        for replica in replicas:
            await replica.kill()

    for service in ("monitor", "projector"):
        assert out_of_order(handled.by_service[service]) == [], f"{service} saw a task's events out of order"
        assert len(handled.by_service[service]) == expected[service], f"{service} handled an event twice"
    # The dead replica's partitions moved: the survivor handled tasks of partitions it does not prefer.
    after_kill = handled.by_service["monitor"][killed_at:]
    assert {partition_of(t) % 2 for t, _, r in after_kill if r == 1} == {0, 1}
    assert {r for _, _, r in handled.by_service["monitor"][:killed_at]} == {0, 1}
    # The survivor's monitor knows what it took: every partition it was pinned to since, besides its
    # own (one nobody was pinned to since the kill stays its preferring replica's, the dead one's).
    taken = {partition_of(t) for t, _, r in after_kill if r == 1}
    assert taken | {1, 3, 5, 7} <= replicas[1].held.partitions, "the survivor's monitor does not know it took them"
    # The monitor named no gap, and saw every task end.
    store = ServiceStore("monitor", sqlite_env(tmp_path / "monitor.sqlite"))
    assert [(e.type, e.task_id, e.data) for e in recorded_by(store)] == []
    assert all(store.get_task_aggregate(Watch, task_id).ended for task_id in tasks)
    # The board: every task completed, no gap, never a state out of the flow's order.
    rows = {row["task_id"]: row for row in TaskBoard(SQLiteDatabase(tmp_path / "task_board.sqlite")).list()}
    assert {task_id: (rows[task_id]["state"], rows[task_id]["last_event"], rows[task_id]["gaps"])
            for task_id in tasks} == dict.fromkeys(tasks, ("completed", "TaskCompleted", []))
    assert handled.board_surprises == []
