"""A service's store and the relay that publishes its notification log."""

from __future__ import annotations

import asyncio

import pytest

from events import TaskFailed, WorkspaceReady
from services.provisioner.domain import Workspace
from services.runtime.relay import RELAY_TRACKING, Relay, pending_envelopes
from services.runtime.store import aggregate_id
from services.task_runner.domain import Task
from tests.unit.fakes import FakePublisher, envelopes_in, popo_store


def new_task(task_id: str = "t1") -> Task:
    return Task(task_id, "file:///repo", "fix it", "shell", None)


def test_emitting_and_saving_puts_exactly_that_envelope_in_the_notification_log():
    store = popo_store()
    task = new_task()
    envelope = task.emit(TaskFailed(reason="nope"), actor="tester", causation_id="c1")
    store.save(task)
    assert envelopes_in(store) == [envelope]
    assert envelope.data == {"reason": "nope"}
    assert envelope.causation_id == "c1"
    assert envelope.task_id == "t1"


def test_internal_aggregate_events_are_in_the_log_but_never_pending_for_the_bus():
    store = popo_store()
    task = new_task()
    task.request_workspace(cause="submitted-1")
    task.agent_start_requested("http://vm")
    store.save(task)
    notifications = store.process_recorder.select_notifications(0, 10)
    assert len(notifications) == 3  # Accepted, Recorded(WorkspaceRequested), AgentStartRequested
    assert [e.type for e in pending_envelopes(store)] == ["WorkspaceRequested"]


async def test_relay_drain_publishes_in_notification_order_and_advances_its_position():
    store = popo_store()
    emitted = []
    for n in range(3):
        task = new_task(f"t{n}")
        emitted.append(task.emit(TaskFailed(reason=f"r{n}"), actor="a"))
        store.save(task)
    publisher = FakePublisher()
    relay = Relay(store, publisher)
    assert relay.position() == 0
    assert await relay.drain() == 3
    assert publisher.published == emitted
    assert relay.position() == 6  # three Accepted + three Recorded notifications
    assert pending_envelopes(store) == []
    assert await relay.drain() == 0
    assert len(publisher.batches) == 1


async def test_relay_publishes_a_long_log_in_batches_of_its_batch_size():
    store = popo_store()
    task = new_task()
    emitted = [task.emit(TaskFailed(reason=str(n)), actor="a") for n in range(5)]
    store.save(task)
    publisher = FakePublisher()
    assert await Relay(store, publisher, batch_size=2).drain() == 5
    assert publisher.published == emitted
    assert [len(b) for b in publisher.batches] == [1, 2, 2]  # first batch: Accepted + 1


async def test_relay_resends_from_its_last_position_after_a_failed_publish():
    store = popo_store()
    task = new_task()
    first = task.emit(TaskFailed(reason="one"), actor="a")
    store.save(task)
    publisher = FakePublisher()
    publisher.fail_with = ConnectionError("nats down")
    relay = Relay(store, publisher)
    with pytest.raises(ConnectionError):
        await relay.drain()
    assert relay.position() == 0
    assert [e.event_id for e in pending_envelopes(store)] == [first.event_id]
    publisher.fail_with = None
    assert await relay.drain() == 1
    assert [e.event_id for e in publisher.published] == [first.event_id]
    assert relay.position() == 2


async def test_a_new_relay_after_a_crash_publishes_only_what_is_new():
    store = popo_store()
    task = new_task()
    old = task.emit(TaskFailed(reason="old"), actor="a")
    store.save(task)
    first_publisher = FakePublisher()
    await Relay(store, first_publisher).drain()
    task.emit(TaskFailed(reason="new"), actor="a")
    store.save(task)
    assert [e.data["reason"] for e in pending_envelopes(store)] == ["new"]
    second_publisher = FakePublisher()  # the process restarted: a fresh relay, same store
    assert await Relay(store, second_publisher).drain() == 1
    assert [e.data["reason"] for e in second_publisher.published] == ["new"]
    assert old.event_id not in {e.event_id for e in second_publisher.published}
    assert store.process_recorder.max_tracking_id(RELAY_TRACKING) == 3


async def test_a_log_of_only_internal_events_advances_the_position_without_publishing():
    store = popo_store()
    store.save(new_task())
    publisher = FakePublisher()
    relay = Relay(store, publisher)
    assert await relay.drain() == 0
    assert publisher.batches == []
    assert relay.position() == 1


async def test_a_running_relay_publishes_soon_after_a_save_wakes_it():
    store = popo_store()
    publisher = FakePublisher()
    running = asyncio.create_task(Relay(store, publisher).run(poll_interval_s=30))
    try:
        await asyncio.sleep(0)
        task = new_task()
        emitted = task.emit(TaskFailed(reason="x"), actor="a")
        store.save(task)
        for _ in range(200):
            if publisher.published:
                break
            await asyncio.sleep(0.005)
        assert publisher.published == [emitted]
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


def test_an_aggregate_rebuilt_from_the_store_has_the_same_state():
    store = popo_store()
    task = Task("t7", "file:///r", "p", "codex", "dev")
    task.request_workspace(cause="c0")
    task.agent_start_requested("http://vm:1")
    store.save(task)
    rebuilt = store.get_task_aggregate(Task, "t7")
    assert rebuilt is not task
    assert rebuilt.id == Task.id_for("t7") == aggregate_id("Task", "t7")
    assert (rebuilt.state, rebuilt.attempt, rebuilt.attempt_id) == ("starting", 1, "t7-a1")
    assert (rebuilt.repo, rebuilt.agent, rebuilt.base_branch) == ("file:///r", "codex", "dev")
    assert rebuilt.vm_agent_url == "http://vm:1"
    assert rebuilt.seen_types == ["WorkspaceRequested"]
    assert rebuilt.version == task.version == 3


def test_an_unknown_task_has_no_aggregate_and_kinds_have_distinct_ids():
    store = popo_store()
    assert store.get_task_aggregate(Task, "missing") is None
    assert Task.id_for("t1") != Workspace.id_for("t1")
    assert Task.id_for("t1") == Task.id_for("t1")


def test_a_workspace_emits_ready_caused_by_its_request_and_remembers_the_url():
    store = popo_store()
    workspace = Workspace("t1", "file:///r", None, "local", cause="req-1")
    workspace.ready(workspace_id="w1", vm_agent_url="http://vm:9", credential_expires_at=1_900_000_000)
    store.save(workspace)
    [ready] = envelopes_in(store)
    assert (ready.type, ready.causation_id, ready.actor) == (
        WorkspaceReady.type, "req-1", "service:provisioner"
    )
    assert ready.data == {"workspace_id": "w1", "provider": "local", "vm_agent_url": "http://vm:9",
                          "credential_expires_at": 1_900_000_000}
    rebuilt = store.get_task_aggregate(Workspace, "t1")
    assert rebuilt.is_settled and rebuilt.vm_agent_url == "http://vm:9" and rebuilt.failure is None


class CountingReads:
    """Counts how often the relay reads the store's notification log."""

    def __init__(self, store) -> None:
        self.reads = 0
        recorder = store.process_recorder
        select = recorder.select_notifications

        def counted(*args, **kwargs):
            self.reads += 1
            return select(*args, **kwargs)

        recorder.select_notifications = counted


async def test_what_was_just_recorded_is_published_from_memory_not_read_back():
    store = popo_store()
    publisher = FakePublisher()
    relay = Relay(store, publisher, batch_size=3)
    log_reads = CountingReads(store)
    task = new_task()
    emitted = [task.emit(TaskFailed(reason=str(n)), actor="a") for n in range(7)]
    store.save(task)
    assert await relay.drain() == 7
    assert publisher.published == emitted
    assert [len(b) for b in publisher.batches] == [2, 3, 2]
    assert log_reads.reads == 1  # Only to see that nothing else is pending.
    assert relay.position() == 8
    assert pending_envelopes(store) == []


async def test_events_recorded_before_the_relay_existed_come_from_the_log_then_memory_follows():
    store = popo_store()
    task = new_task()
    before = [task.emit(TaskFailed(reason=f"before {n}"), actor="a") for n in range(3)]
    store.save(task)
    publisher = FakePublisher()
    relay = Relay(store, publisher)
    after = task.emit(TaskFailed(reason="after"), actor="a")
    store.save(task)  # In memory: notification 5, but the position is 0: a gap.
    assert await relay.drain() == 4
    assert publisher.published == [*before, after]
    later = task.emit(TaskFailed(reason="later"), actor="a")
    store.save(task)
    assert await relay.drain() == 1
    assert publisher.published == [*before, after, later]
    assert relay.position() == 6


async def test_a_gap_in_memory_is_filled_from_the_log_and_nothing_is_published_twice():
    store = popo_store()
    publisher = FakePublisher()
    relay = Relay(store, publisher)
    first, second, third = new_task("t1"), new_task("t2"), new_task("t3")
    one = first.emit(TaskFailed(reason="1"), actor="a")
    store.save(first)
    listeners, store._listeners = store._listeners, []
    two = second.emit(TaskFailed(reason="2"), actor="a")
    store.save(second)  # Committed, but the relay never heard of it (e.g. another writer).
    store._listeners = listeners
    three = third.emit(TaskFailed(reason="3"), actor="a")
    store.save(third)
    assert await relay.drain() == 3
    assert publisher.published == [one, two, three]
    assert await relay.drain() == 0


async def test_after_a_failed_publish_the_batch_is_read_again_from_the_log():
    store = popo_store()
    publisher = FakePublisher()
    relay = Relay(store, publisher)
    task = new_task()
    emitted = [task.emit(TaskFailed(reason=str(n)), actor="a") for n in range(3)]
    store.save(task)
    publisher.fail_with = ConnectionError("nats down")
    with pytest.raises(ConnectionError):
        await relay.drain()
    publisher.fail_with = None
    assert await relay.drain() == 3
    assert publisher.published == emitted
    assert relay.position() == 4


async def test_memory_is_bounded_while_nothing_can_be_published(monkeypatch):
    import services.runtime.relay as relay_module

    monkeypatch.setattr(relay_module, "MEMORY_LIMIT", 4)
    store = popo_store()
    publisher = FakePublisher()
    relay = Relay(store, publisher, batch_size=2)
    emitted = []
    for n in range(5):
        task = new_task(f"t{n}")
        emitted.append(task.emit(TaskFailed(reason=str(n)), actor="a"))
        store.save(task)
        assert len(relay._recent) <= 4 + 2
    assert await relay.drain() == 5
    assert publisher.published == emitted
    assert pending_envelopes(store) == []


def test_a_rebuilt_aggregate_validates_what_was_stored_and_an_emitting_one_does_not_round_trip():
    store = popo_store()
    task = new_task()
    emitted = task.emit(TaskFailed(reason="x"), actor="a")
    assert "_emitting" not in task.__dict__
    store.save(task)
    [notification] = [n for n in store.process_recorder.select_notifications(0, 10)
                      if n.topic.endswith("TaskAggregate.Recorded")]
    assert notification.topic == "services.runtime.store:TaskAggregate.Recorded"
    rebuilt = store.get_task_aggregate(Task, "t1")
    assert rebuilt.seen_types == task.seen_types == ["TaskFailed"]
    assert envelopes_in(store) == [emitted]


def test_events_stored_by_earlier_versions_still_rebuild_and_relay():
    """The stored format of an emitted envelope, as written before `Recorded` became a class."""
    from eventsourcing.persistence import StoredEvent

    store = popo_store()
    task_id = Task.id_for("t9")
    opened = new_task("t9")
    store.save(opened)
    state = (
        b'{"timestamp":{"_type_":"datetime_iso","_data_":"2026-11-21T02:22:03.493686+00:00"},'
        b'"envelope":{"event_id":"1977d475235742ae9519ec040894614e","type":"TaskFailed","task_id":"t9",'
        b'"occurred_at":"2026-11-21T02:22:03.493400Z","actor":"a","causation_id":null,'
        b'"data":{"reason":"old"}}}'
    )
    store.process_recorder.insert_events([StoredEvent(
        originator_id=task_id, originator_version=2,
        topic="services.runtime.store:TaskAggregate.Recorded", state=state)])
    rebuilt = store.get_task_aggregate(Task, "t9")
    assert rebuilt.version == 2 and rebuilt.seen_types == ["TaskFailed"]
    [old] = envelopes_in(store)
    assert (old.event_id, old.data) == ("1977d475235742ae9519ec040894614e", {"reason": "old"})


async def test_the_bytes_published_are_the_envelopes_json_from_memory_and_from_the_log(tmp_path):
    from services.runtime.store import ServiceStore, sqlite_env

    class RawPublisher:
        def __init__(self) -> None:
            self.payloads: list[bytes] = []

        async def publish_batch(self, messages) -> None:
            self.payloads += [m.to_json() for m in messages]

    store = ServiceStore("test", sqlite_env(tmp_path / "s.sqlite"))
    task = new_task()
    before = task.emit(TaskFailed(reason="from the log ✓ \"q\""), actor="a")
    store.save(task)
    publisher = RawPublisher()
    relay = Relay(store, publisher)
    after = task.emit(TaskFailed(reason="from memory é\n"), actor="a")
    store.save(task)
    await relay.drain()  # `before` is not in memory: read from the log; then `after`.
    again = task.emit(TaskFailed(reason="memory again"), actor="a")
    store.save(task)
    await relay.drain()
    assert publisher.payloads == [before.to_json(), after.to_json(), again.to_json()]


def test_emitted_envelopes_are_exactly_what_envelope_for_would_build():
    import uuid
    from datetime import UTC, datetime

    from pydantic import TypeAdapter

    from events import AgentOutput, Envelope, StepOverdue
    from services.runtime.store import _envelope_and_payload, _json_time

    events = [AgentOutput(seq=1, stream="stdout", text="é ✓ \"x\"\n"), StepOverdue(expected="A", after="B", waited_s=1.5),
              TaskFailed(reason="r")]
    for event in events * 2:  # The second time round: the task id is known valid.
        envelope, payload = _envelope_and_payload(event, "t-fast", "agent:shell", "cause-1")
        assert payload == envelope.model_dump(mode="json")
        assert Envelope.model_validate(payload) == envelope
        assert Envelope.from_json(envelope.to_json()) == envelope
        assert uuid.UUID(hex=envelope.event_id).version == 4 and uuid.UUID(hex=envelope.event_id).hex == envelope.event_id
    times = TypeAdapter(datetime)
    for moment in (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, 5, 120, tzinfo=UTC),
                   datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=UTC), datetime.now(UTC)):
        assert _json_time(moment) == times.dump_python(moment, mode="json")


def test_a_bad_task_id_is_still_refused():
    import pydantic

    with pytest.raises(pydantic.ValidationError):
        Task("bad task.id", "file:///r", "p", "shell", None).emit(TaskFailed(reason="x"), actor="a")


async def test_an_event_too_big_for_the_bus_is_dead_lettered_once_and_the_next_one_is_published():
    store = popo_store()
    first, huge, after = new_task("t1"), new_task("t2"), new_task("t3")
    before = first.emit(TaskFailed(reason="fits"), actor="a")
    store.save(first)
    too_big = huge.emit(TaskFailed(reason="x" * 5000), actor="a")
    store.save(huge)
    following = after.emit(TaskFailed(reason="fits too"), actor="a")
    store.save(after)
    publisher = FakePublisher(max_payload=2000)
    relay = Relay(store, publisher)

    # One drain gets past it: the events on either side are published, in order.
    assert await relay.drain() == 2
    assert publisher.published == [before, following]
    # The bus refused it once; a small record of it is parked, without the event itself.
    assert publisher.refused == 1
    [(subject, body, msg_id)] = publisher.dead_letters
    assert subject == "baton.deadletter.relay.test"
    assert body["event_id"] == too_big.event_id == msg_id.removeprefix("relay-")
    assert (body["type"], body["task_id"], body["producer"]) == ("TaskFailed", "t2", "test")
    assert body["size"] == len(too_big.to_json()) and "over 2000" in body["reason"]
    assert "x" * 100 not in str(body)
    assert relay.dead_lettered == 1
    # Its position is recorded past it: nothing is pending, nothing is retried.
    assert pending_envelopes(store) == [] and relay.position() == 6
    assert await relay.drain() == 0
    assert publisher.refused == 1 and len(publisher.dead_letters) == 1


async def test_a_running_relay_is_not_jammed_by_an_unpublishable_event_and_publishes_the_next_task():
    store = popo_store()
    publisher = FakePublisher(max_payload=2000)
    running = asyncio.create_task(Relay(store, publisher).run(poll_interval_s=30, retry_s=0.01))
    try:
        huge = new_task("t1")
        huge.emit(TaskFailed(reason="x" * 5000), actor="a")
        store.save(huge)
        nxt = new_task("t2")
        next_task = nxt.emit(TaskFailed(reason="next"), actor="a")
        store.save(nxt)
        for _ in range(200):
            if publisher.published:
                break
            await asyncio.sleep(0.005)
        assert publisher.published == [next_task]
        assert publisher.refused == 1 and len(publisher.dead_letters) == 1
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_relay_that_cannot_even_dead_letter_retries_from_its_position():
    store = popo_store()
    task = new_task()
    too_big = task.emit(TaskFailed(reason="x" * 5000), actor="a")
    store.save(task)
    publisher = FakePublisher(max_payload=2000)
    relay = Relay(store, publisher)
    real_dead_letter = publisher.publish_dead_letter

    async def nats_down(*args, **kwargs):
        raise ConnectionError("nats down")

    publisher.publish_dead_letter = nats_down
    with pytest.raises(ConnectionError):
        await relay.drain()
    assert relay.position() == 0  # Not past it until it is parked somewhere people can see.
    publisher.publish_dead_letter = real_dead_letter
    assert await relay.drain() == 0
    assert [body["event_id"] for _, body, _ in publisher.dead_letters] == [too_big.event_id]
    assert relay.position() == 2


async def test_a_vm_agent_relay_dead_letters_to_the_subject_its_credential_allows():
    from services.runtime.bus import vm_agent_dead_letter_subject

    store = popo_store()
    task = new_task("0123456789abcdef")
    task.emit(TaskFailed(reason="x" * 5000), actor="a")
    store.save(task)
    publisher = FakePublisher(max_payload=2000)
    subject = vm_agent_dead_letter_subject("0123456789abcdef")
    await Relay(store, publisher, dead_letter_subject=subject).drain()
    assert [s for s, _, _ in publisher.dead_letters] == ["baton.deadletter.vm_agent.0123456789abcdef"]


async def test_the_producer_is_told_of_each_event_set_aside_so_it_can_end_what_waited_for_it():
    store = popo_store()
    task = new_task("t9")
    task.emit(TaskFailed(reason="x" * 5000), actor="a")
    store.save(task)
    told: list[tuple[str, str, str]] = []
    await Relay(store, FakePublisher(max_payload=2000), on_dead_letter=lambda *lost: told.append(lost)).drain()
    [(task_id, event_type, reason)] = told
    assert (task_id, event_type) == ("t9", "TaskFailed") and "over 2000" in reason
