"""Two monitor replicas share one store: each names the gaps of the tasks in the partitions it
holds, never the other's, and a partition taken over brings its tasks' timers along."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from eventsourcing.persistence import IntegrityError, Tracking

from events import DEADLINES, Envelope, parse_deadlines, partition_of
from services.monitor.domain import Watch
from services.monitor.handlers import Monitor
from services.runtime.partitions import HeldPartitions
from services.runtime.store import SpoiledAggregate
from tests.unit.fakes import envelopes_in, popo_store

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
_seq = itertools.count(1)


def held_as_preferred(replica: tuple[int, int]) -> HeldPartitions:
    """A replica's partitions once its readers heard nobody is pinned anywhere: those it prefers."""
    held = HeldPartitions(replica)
    for partition in range(8):
        held.observe(partition, None)
    return held


def task_in(partition: int) -> str:
    return next(t for t in (f"task{n}" for n in itertools.count()) if partition_of(t) == partition)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def ready(m: Monitor, task_id: str) -> None:
    envelope = Envelope(type="WorkspaceReady", task_id=task_id, actor="test", occurred_at=at(0))
    await m.on_event(envelope, Tracking(f"monitor-p{partition_of(task_id)}", next(_seq)))


def overdue_tasks(m: Monitor) -> set[str]:
    return {e.task_id for e in envelopes_in(m.store) if e.type == "StepOverdue"}


async def test_each_replica_names_the_gaps_of_its_own_partitions_only():
    store, deadlines = popo_store(), parse_deadlines("PromptDelivered=30", DEADLINES)
    first = Monitor(store, deadlines, stall_after_s=300, held=held_as_preferred((0, 2)))
    second = Monitor(store, deadlines, stall_after_s=300, held=held_as_preferred((1, 2)))
    even, odd = task_in(0), task_in(1)
    await ready(first, even)
    await ready(second, odd)
    second.resume()  # A restart of the second: it loads only its own partitions' timers.
    assert set(second.watches) == {odd}

    first.tick(at(31))
    second.tick(at(31))
    assert overdue_tasks(first) == {even, odd}  # One store: each named exactly one task.
    assert [e.task_id for e in envelopes_in(store) if e.type == "StepOverdue"].count(odd) == 1


async def test_a_partition_taken_over_brings_its_timers_and_a_given_up_one_is_dropped():
    store, deadlines = popo_store(), parse_deadlines("PromptDelivered=30", DEADLINES)
    first = Monitor(store, deadlines, stall_after_s=300, held=held_as_preferred((0, 2)))
    second = Monitor(store, deadlines, stall_after_s=300, held=held_as_preferred((1, 2)))
    even = task_in(2)
    await ready(first, even)
    # The first replica dies; the second is pinned to partition 2 and takes its tasks over.
    second.held.change(2, True)
    assert even in second.watches
    second.tick(at(31))
    assert overdue_tasks(second) == {even}
    # The first comes back paused-and-stale: told it lost the partition, it forgets the task.
    first.held.change(2, False)
    assert even not in first.watches


async def test_a_sole_replica_holds_every_partition_whatever_it_hears():
    held = HeldPartitions((0, 1))
    held.change(3, False)
    assert all(k in held for k in range(8))


def test_a_replica_holds_what_it_is_pinned_to_not_what_another_is_and_an_unpinned_one_if_it_prefers_it():
    held = held_as_preferred((0, 2))
    held.observe(0, False)  # Restarted while the other replica took its partition over.
    held.observe(1, True)  # Pinned to the other's while it was away.
    held.observe(2, None)  # Nobody pinned (quiet since the pin timed out): its preferrer holds it.
    held.observe(3, None)
    assert sorted(held.partitions) == [1, 2, 4, 6]


async def test_a_resumed_task_is_not_stalled_for_the_silence_before_the_resume():
    store, deadlines = popo_store(), parse_deadlines("PromptDelivered=30", DEADLINES)
    first = Monitor(store, deadlines, stall_after_s=60)
    task_id = task_in(4)
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    for event_type, data in (("WorkspaceReady", {}), ("PromptDelivered", {"session_id": "s", "prompt_sha256": "x"})):
        await first.on_event(Envelope(type=event_type, task_id=task_id, actor="test", occurred_at=long_ago, data=data),
                             Tracking("monitor-p4", next(_seq)))
    taken_over = Monitor(store, deadlines, stall_after_s=60)
    taken_over.resume()
    taken_over.tick(datetime.now(UTC) + timedelta(seconds=30))
    assert not [e for e in envelopes_in(store) if e.type == "AgentStalled"]
    taken_over.tick(datetime.now(UTC) + timedelta(seconds=90))  # Silent a minute after the resume: stalled.
    assert [e.type for e in envelopes_in(store) if e.type == "AgentStalled"] == ["AgentStalled"]


def test_one_of_several_replicas_holds_nothing_until_jetstream_says():
    assert HeldPartitions((1, 2)).partitions == set()


def test_a_quiet_partition_whose_preferring_replica_is_dead_is_held_by_the_next_live_one():
    """No pin (no event since the last pin timed out): the replica that prefers the partition
    holds it; while that one is silent, the next live replica after it does, and gives it back
    once it is heard again."""
    dead: set[int] = set()
    replicas = [HeldPartitions((index, 3)) for index in range(3)]
    for held in replicas:
        held.replica_alive = lambda replica: replica not in dead
    changes: list[tuple[int, int, bool]] = []
    for held in replicas:
        held.listeners.append(lambda partition, now_held, index=held.index: changes.append((index, partition, now_held)))

    def observe_all(partition: int) -> list[int]:
        for held in replicas:
            if held.index not in dead:
                held.observe(partition, None)
        return [held.index for held in replicas if partition in held and held.index not in dead]

    assert observe_all(4) == [1]  # 4 % 3: replica 1 prefers it.
    dead.add(1)
    assert observe_all(4) == [2]  # The next live one after it.
    dead.add(2)
    assert observe_all(4) == [0]  # ... and after that one, wrapping round.
    dead.clear()
    assert observe_all(4) == [1]  # Heard again: given back.
    assert (2, 4, True) in changes and (2, 4, False) in changes
    # A pin, where there is one, decides whatever the heartbeats say.
    dead.add(1)
    replicas[0].observe(4, False)
    replicas[2].observe(4, False)
    assert 4 not in replicas[0] and 4 not in replicas[2]


def test_replica_liveness_hears_each_replica_and_trusts_all_until_it_has_listened_long_enough(monkeypatch):
    from services.runtime.heartbeat import HeartbeatBoard

    board = HeartbeatBoard(stale_after_s=5.0)
    assert board.replica_alive("monitor", 1), "not listening yet: taken for alive"
    now = 1000.0
    monkeypatch.setattr("services.runtime.heartbeat.time.monotonic", lambda: now)
    board.listening_since = now - 1.0
    board.replicas_seen = {("monitor", 0): now - 0.5}
    assert board.replica_alive("monitor", 1), "listening for only a second: not judged yet"
    board.listening_since = now - 6.0
    assert board.replica_alive("monitor", 0) and not board.replica_alive("monitor", 1)
    board.replicas_seen[("monitor", 0)] = now - 5.5
    assert not board.replica_alive("monitor", 0)


async def test_a_replica_whose_batch_lost_a_race_reads_its_watches_again_and_never_records_past_a_gap():
    # Both replicas folded two tasks (their partition moving between them); the other saved one
    # first, so the late replica's batch of both is refused whole.
    store, deadlines = popo_store(), parse_deadlines("PromptDelivered=30", DEADLINES)
    late, first = Monitor(store, deadlines, stall_after_s=300), Monitor(store, deadlines, stall_after_s=300)
    raced, bystander = task_in(3), next(t for t in (f"other{n}" for n in itertools.count()) if partition_of(t) == 3)
    for task_id in (raced, bystander):
        await ready(late, task_id)
        await ready(first, task_id)  # Both cache each watch as saved.

    def started(task_id: str) -> tuple[Envelope, Tracking]:
        return (Envelope(type="AgentSessionStarted", task_id=task_id, actor="test", occurred_at=at(1)),
                Tracking("monitor-p3", next(_seq)))

    await first.on_event(*started(raced))
    batch = [started(raced), started(bystander)]
    with pytest.raises(IntegrityError):
        await late.on_batch(batch)
    # Handled again one at a time (as the consumer does after a failed batch), then on.
    for envelope, tracking in batch:
        await late.on_event(envelope, tracking)
    await late.on_event(Envelope(type="PromptDelivered", task_id=bystander, actor="test", occurred_at=at(2),
                                 data={"session_id": "s", "prompt_sha256": "x"}), Tracking("monitor-p3", next(_seq)))
    for task_id in (raced, bystander):  # Readable: no version recorded after one never stored.
        assert "AgentSessionStarted" in store.get_task_aggregate(Watch, task_id).seen
    assert "PromptDelivered" in store.get_task_aggregate(Watch, bystander).seen


async def test_an_aggregate_whose_save_failed_is_never_saved_again():
    store = popo_store()
    watch = Watch(task_in(2))
    store.save(watch)
    stale = store.get_task_aggregate(Watch, watch.task_id)
    watch.observe("WorkspaceReady", at(0).isoformat(), "e1")
    stale.observe("WorkspaceReady", at(0).isoformat(), "e2")
    store.save(watch)
    with pytest.raises(IntegrityError):
        store.save(stale)
    stale.observe("PromptDelivered", at(1).isoformat(), "e3")  # Its lost event is not in the store…
    with pytest.raises(SpoiledAggregate):  # …so this one, on top of it, is refused.
        store.save(stale)
    assert store.get_task_aggregate(Watch, watch.task_id).seen == watch.seen
