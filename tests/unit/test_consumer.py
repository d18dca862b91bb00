"""services.runtime.consumer._process with fake messages: effects happen once."""

from __future__ import annotations

import json

from eventsourcing.persistence import IntegrityError, Tracking

from events import Envelope, TaskFailed, envelope_for
from services.runtime.bus import DEAD_LETTER_PREFIX
from services.runtime.consumer import (
    MAX_DELIVER,
    _process,
)
from tests.unit.fakes import FakeBus, FakeMsg, popo_store

DURABLE = "svc-TaskFailed"


def message(seq: int, reason: str = "r", *, delivered: int = 1) -> FakeMsg:
    envelope = envelope_for(TaskFailed(reason=reason), task_id="t1", actor="a")
    return FakeMsg(data=envelope.to_json(), stream_seq=seq, num_delivered=delivered)


class Recorder:
    """A handler that records what it saw and fails while `failing` is set."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        self.failing = False

    async def __call__(self, envelope, tracking: Tracking) -> None:
        if self.failing:
            raise RuntimeError("transient")
        self.seen.append((envelope.data["reason"], tracking.notification_id))


async def test_a_handled_message_is_tracked_under_the_durable_and_stream_seq_then_acked():
    store, handler, msg = popo_store(), Recorder(), message(4, "x")
    await _process(FakeBus(), DURABLE, msg, handler, store)
    assert handler.seen == [("x", 4)]
    assert store.is_processed(Tracking(DURABLE, 4))
    assert msg.acks == ["ack"]


async def test_a_redelivered_message_is_acked_without_running_the_handler_again():
    store, handler = popo_store(), Recorder()
    await _process(FakeBus(), DURABLE, message(4, "x"), handler, store)
    again = message(4, "x", delivered=2)
    await _process(FakeBus(), DURABLE, again, handler, store)
    assert handler.seen == [("x", 4)]
    assert again.acks == ["ack"]


async def test_an_undecodable_message_is_dead_lettered_tracked_and_acked():
    store, handler, bus = popo_store(), Recorder(), FakeBus()
    msg = FakeMsg(data=b"{not json", stream_seq=2)
    await _process(bus, DURABLE, msg, handler, store)
    assert handler.seen == []
    assert msg.acks == ["ack"]
    assert store.is_processed(Tracking(DURABLE, 2))
    [(subject, payload)] = bus.js.published
    assert subject == f"{DEAD_LETTER_PREFIX}.{DURABLE}"
    body = json.loads(payload)
    assert (body["stream_seq"], body["data"]) == (2, "{not json")
    assert body["error"].startswith("undecodable envelope")


async def test_an_envelope_claiming_another_task_than_its_subject_is_dead_lettered_not_acted_on():
    # A vm_agent may publish only on its own task's subjects; what it writes inside is its own.
    forged = Envelope(type="SessionFailed", task_id="victim", actor="vm_agent", data={"reason": "forged"})
    store, handler, bus = popo_store(), Recorder(), FakeBus()
    msg = FakeMsg(data=forged.to_json(), stream_seq=5, subject="baton.task.mine.AgentOutput")
    await _process(bus, DURABLE, msg, handler, store)
    assert handler.seen == []
    assert msg.acks == ["ack"] and store.is_processed(Tracking(DURABLE, 5))
    [(_, payload)] = bus.js.published
    assert json.loads(payload)["error"].startswith("misrouted envelope: it says SessionFailed of task victim")


async def test_a_dead_letter_keeps_only_the_start_of_a_big_message_so_it_always_fits_the_bus():
    store, handler, bus = popo_store(), Recorder(), FakeBus()
    msg = FakeMsg(data=b"{" + b"\x01" * 900_000, stream_seq=3)  # Near the bus's limit, 6x as JSON.
    await _process(bus, DURABLE, msg, handler, store)
    [(_, payload)] = bus.js.published
    body = json.loads(payload)
    assert body["size"] == 900_001 and len(body["data"]) == 64 * 1024
    assert len(payload) < 1024 * 1024
    assert msg.acks == ["ack"]


class FailsTimes(Recorder):
    """Fails the first `times` calls, then records."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times

    async def __call__(self, envelope, tracking: Tracking) -> None:
        if self.times:
            self.times -= 1
            raise RuntimeError("transient")
        await super().__call__(envelope, tracking)


async def test_a_handler_that_fails_once_is_retried_in_place_and_its_effect_happens_once():
    store, handler = popo_store(), FailsTimes(1)
    msg = message(5, "five")
    await _process(FakeBus(), DURABLE, msg, handler, store, retry_delays_s=(0, 0))
    assert handler.seen == [("five", 5)]
    assert msg.acks == ["in_progress", "ack"]
    assert store.is_processed(Tracking(DURABLE, 5))


async def test_a_handler_that_loses_races_for_an_aggregate_is_retried_past_the_ordinary_retries():
    """Replicas racing for one aggregate (the task runner's queue in a burst): another saved it
    first, again and again; the handler reads it again and wins, nothing is dead-lettered."""
    store, bus = popo_store(), FakeBus()

    class LosesRaces(Recorder):
        losses = 5

        async def __call__(self, envelope, tracking: Tracking) -> None:
            if self.losses:
                self.losses -= 1
                raise IntegrityError("UNIQUE constraint failed: stored_events.originator_id, originator_version")
            await super().__call__(envelope, tracking)

    handler = LosesRaces()
    await _process(bus, DURABLE, message(7, "seven"), handler, store, retry_delays_s=(0, 0))
    assert handler.seen == [("seven", 7)] and bus.js.published == []


async def test_messages_stay_in_order_so_a_failure_never_lets_a_later_one_overtake_it():
    store, handler = popo_store(), FailsTimes(2)
    await _process(FakeBus(), DURABLE, message(5, "five"), handler, store, retry_delays_s=(0, 0))
    await _process(FakeBus(), DURABLE, message(6, "six"), handler, store, retry_delays_s=(0, 0))
    assert handler.seen == [("five", 5), ("six", 6)]


async def test_a_handler_that_keeps_failing_is_dead_lettered_tracked_and_the_consumer_moves_on():
    store, handler, bus = popo_store(), Recorder(), FakeBus()
    handler.failing = True
    msg = message(3)
    await _process(bus, DURABLE, msg, handler, store, retry_delays_s=(0, 0))
    assert msg.acks[-1] == "ack"
    assert store.is_processed(Tracking(DURABLE, 3))
    assert "RuntimeError('transient')" in json.loads(bus.js.published[0][1])["error"]


async def test_a_message_delivered_too_often_is_dead_lettered_without_running_the_handler():
    store, handler, bus = popo_store(), Recorder(), FakeBus()
    msg = message(3, delivered=MAX_DELIVER + 1)
    await _process(bus, DURABLE, msg, handler, store)
    assert handler.seen == []
    assert msg.acks == ["ack"]
    assert "delivered 6 times" in json.loads(bus.js.published[0][1])["error"]


async def test_a_batch_is_applied_once_in_order_and_acked():
    from services.runtime.consumer import _process_batch

    store, seen = popo_store(), []

    async def apply_batch(items):
        seen.append([t.notification_id for _, t in items])
        store.save_processed(items[-1][1])

    msgs = [message(seq, f"r{seq}") for seq in (1, 2, 3)]
    await _process_batch(FakeBus(), DURABLE, msgs, Recorder(), apply_batch, store)

    assert seen == [[1, 2, 3]]
    assert all(m.acks == ["ack"] for m in msgs)


async def test_a_failing_batch_falls_back_to_one_at_a_time_and_dead_letters_only_the_bad_one(monkeypatch):
    from services.runtime.consumer import _process_batch

    store, bus, handler = popo_store(), FakeBus(), Recorder()

    async def broken_batch(items):
        raise RuntimeError("one of these is bad")

    class FailsOnBad(Recorder):
        async def __call__(self, envelope, tracking):
            if envelope.data["reason"] == "bad":
                raise RuntimeError("bad")
            await super().__call__(envelope, tracking)

    handler = FailsOnBad()
    msgs = [message(1, "ok1"), message(2, "bad"), message(3, "ok3")]
    monkeypatch.setattr("services.runtime.consumer.RETRY_DELAYS_S", (0,))

    await _process_batch(bus, DURABLE, msgs, handler, broken_batch, store)

    assert handler.seen == [("ok1", 1), ("ok3", 3)]
    assert len(bus.js.published) == 1 and "bad" in bus.js.published[0][1].decode()


class CountingStore:
    """A tracking store that counts its position queries."""

    def __init__(self) -> None:
        self.store = popo_store()
        self.queries = 0

    def is_processed(self, tracking: Tracking) -> bool:
        self.queries += 1
        return self.store.is_processed(tracking)

    def save_processed(self, tracking: Tracking, *aggregates: object) -> None:
        self.store.save_processed(tracking, *aggregates)


async def test_a_batch_in_stream_order_costs_one_position_query_not_one_per_message():
    from services.runtime.consumer import _process_batch

    store, seen = CountingStore(), []

    async def apply_batch(items):
        seen.append([t.notification_id for _, t in items])
        store.save_processed(items[-1][1])

    msgs = [message(seq, f"r{seq}") for seq in range(1, 201)]
    await _process_batch(FakeBus(), DURABLE, msgs, Recorder(), apply_batch, store)
    assert seen == [list(range(1, 201))] and store.queries == 1
    again = [message(seq, f"r{seq}") for seq in range(1, 201)]  # All redelivered: all known.
    await _process_batch(FakeBus(), DURABLE, again, Recorder(), apply_batch, store)
    assert len(seen) == 1 and store.queries == 3
    assert all(m.acks == ["ack"] for m in [*msgs, *again])


async def test_a_batch_partly_processed_or_out_of_order_is_checked_message_by_message():
    from services.runtime.consumer import _process_batch

    store, seen = CountingStore(), []

    async def apply_batch(items):
        seen.append([t.notification_id for _, t in items])
        store.save_processed(items[-1][1])

    store.save_processed(Tracking(DURABLE, 5))
    subscription = Recorder(), apply_batch
    await _process_batch(FakeBus(), DURABLE, [message(s) for s in (4, 5, 6, 7)], *subscription, store)
    await _process_batch(FakeBus(), DURABLE, [message(s) for s in (9, 3, 8)], *subscription, store)
    assert seen == [[6, 7], [9]]  # 8 after 9: the position already covers it.


def test_the_stream_sequence_is_read_from_the_ack_subject_like_nats_py_does():
    from nats.aio.msg import Msg

    from services.runtime.consumer import stream_seq

    v1 = "$JS.ACK.BATON_EVENTS.projector-all.2.1234.987.1700000000000000000.5"
    v2 = "$JS.ACK._.ACCHASH.BATON_EVENTS.projector-all.2.1234.987.1700000000000000000.5.token"
    for reply in (v1, v2):
        msg = Msg(_client=None, subject="baton.task.t.X", reply=reply, data=b"")
        assert stream_seq(msg) == Msg.Metadata._from_reply(reply).sequence.stream == 1234
    assert stream_seq(message(7)) == 7  # No ack subject: its metadata.
