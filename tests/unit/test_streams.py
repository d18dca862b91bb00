"""The stream reader's bookkeeping (services/runtime/streams.py) against a scripted JetStream:
order, the end of the history, back-pressure by acks, gaps, redeliveries, exclusions."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
from nats.js.api import AckPolicy

from services.gateway.routes import streams as routes
from services.runtime.streams import RawEvent, StreamInterrupted, _ack_fields, _Reader, stream_raw

SUBJECT = "baton.task.t1.>"


class FakeNats:
    def __init__(self) -> None:
        self.cb = None
        self.acks: list[str] = []
        self.unsubscribed = False

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject, cb, **limits):
        self.cb = cb
        fake = self

        class Sub:
            async def unsubscribe(self) -> None:
                fake.unsubscribed = True

        return Sub()

    async def publish(self, subject: str, payload: bytes = b"") -> None:
        self.acks.append(subject)


class FakeJetStream:
    def __init__(self, *, num_pending: int, delivered: int = 0, alter=None) -> None:
        self._nc = FakeNats()
        self.num_pending, self.delivered, self.alter = num_pending, delivered, alter
        self.config = None
        self.deleted: list[str] = []

    async def add_consumer(self, stream, config):
        self.config = config
        kept = self.alter(config) if self.alter else config
        return SimpleNamespace(name="C1", config=kept, num_pending=self.num_pending,
                               delivered=SimpleNamespace(consumer_seq=self.delivered, stream_seq=0))

    async def delete_consumer(self, stream, name) -> None:
        self.deleted.append(name)


def reply(sseq: int, cseq: int, pending: int, delivered: int = 1) -> str:
    return f"$JS.ACK.BATON_EVENTS.C1.{delivered}.{sseq}.{cseq}.1700000000000000000.{pending}"


def delivery(sseq: int, cseq: int, pending: int, kind: str = "AgentOutput", data: bytes | None = None, **kw):
    body = data if data is not None else b'{"event_id":"e%d","type":"%s"}' % (sseq, kind.encode())
    return SimpleNamespace(reply=reply(sseq, cseq, pending, **kw), subject=f"baton.task.t1.{kind}",
                           data=body, headers=None)


def heartbeat(last_consumer: int):
    return SimpleNamespace(reply="", subject="_INBOX.test", data=b"",
                           headers={"Status": "100", "Description": "Idle Heartbeat",
                                    "Nats-Last-Consumer": str(last_consumer), "Nats-Last-Stream": "0"})


async def started(js: FakeJetStream, *, window: int = 8, exclude: frozenset[str] = frozenset()) -> _Reader:
    reader = _Reader(js, SUBJECT, window=window, exclude=exclude)
    await reader.start(5)
    return reader


def test_the_ack_subject_gives_the_sequences_with_one_split():
    assert _ack_fields(reply(42, 7, 3)) == (42, 7, False)
    assert _ack_fields(reply(42, 7, 0)) == (42, 7, True)
    # The longer form, with a domain and an account hash.
    assert _ack_fields("$JS.ACK.dom.HASH.BATON_EVENTS.C1.1.42.7.1700000000.0.xyz") == (42, 7, True)
    with pytest.raises(ValueError):
        _ack_fields("$JS.ACK.nope")


def test_the_consumer_starts_where_asked_pushes_with_a_window_and_is_removed_after():
    async def run():
        js = FakeJetStream(num_pending=1)
        batches = []

        async def feed():
            while js._nc.cb is None:
                await asyncio.sleep(0)
            await js._nc.cb(delivery(5, 1, 0))

        feeder = asyncio.create_task(feed())
        async for batch in stream_raw(js, SUBJECT, from_seq=5, follow=False, batch=16):
            batches.append(batch)
        await feeder
        return js, batches

    js, batches = asyncio.run(run())
    config = js.config
    assert (config.opt_start_seq, config.filter_subject, config.ack_policy, config.max_ack_pending) == (
        5, SUBJECT, AckPolicy.ALL, 16)
    assert config.deliver_subject == "_INBOX.test" and config.idle_heartbeat
    assert [[e.stream_seq for e in b] for b in batches] == [[5]]
    assert js.deleted == ["C1"] and js._nc.unsubscribed


def test_history_comes_in_order_with_stream_seq_spliced_and_ends_when_nothing_is_pending():
    async def run():
        reader = await started(FakeJetStream(num_pending=3))
        for sseq, cseq, pending in ((5, 1, 2), (6, 2, 1), (9, 3, 0)):
            await reader._on_message(delivery(sseq, cseq, pending))
        first = await reader.next(False)
        return first, await reader.next(False)

    first, end = asyncio.run(run())
    assert [e.stream_seq for e in first] == [5, 6, 9]
    assert json.loads(first[2].json) == {"event_id": "e9", "type": "AgentOutput", "stream_seq": 9}
    assert first[0] == RawEvent(5, "AgentOutput", b'{"event_id":"e5","type":"AgentOutput","stream_seq":5}')
    assert end is None


def test_an_empty_history_ends_at_once_unless_following():
    async def run():
        reader = await started(FakeJetStream(num_pending=0))
        assert await reader.next(False) is None
        follower = await started(FakeJetStream(num_pending=0))
        waiting = asyncio.create_task(follower.next(True))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await follower._on_message(delivery(12, 1, 0))
        return await waiting

    assert [e.stream_seq for e in asyncio.run(run())] == [12]


def test_deliveries_made_before_the_consumer_was_described_are_still_waited_for():
    async def run():
        # JetStream had pushed 2 (everything) when it answered: num_pending 0 is not the end yet.
        reader = await started(FakeJetStream(num_pending=0, delivered=2))
        waiting = asyncio.create_task(reader.next(False))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        await reader._on_message(delivery(5, 1, 1))
        await reader._on_message(delivery(6, 2, 0))
        got = await waiting
        return got, await reader.next(False)

    got, end = asyncio.run(run())
    assert [e.stream_seq for e in got] == [5, 6]
    assert end is None


def test_acks_follow_what_the_caller_took_never_what_was_only_delivered():
    async def run():
        js = FakeJetStream(num_pending=100)
        reader = await started(js, window=8)  # acks every 2 taken
        for i in range(1, 5):
            await reader._on_message(delivery(i + 4, i, 100 - i))
        batch = await reader.next(True)
        acked_while_held = list(js._nc.acks)
        await reader._on_message(delivery(9, 5, 95))
        await reader.next(True)  # the caller is done with the first batch
        return batch, acked_while_held, js._nc.acks

    batch, acked_while_held, acks = asyncio.run(run())
    assert len(batch) == 4
    assert acked_while_held == []
    # AckAll on the last delivery handed out with the first batch, not on the one after it.
    assert acks == [reply(8, 4, 96)]


def test_when_everything_delivered_was_taken_it_acks_before_waiting():
    async def run():
        js = FakeJetStream(num_pending=100)
        reader = await started(js, window=100)
        await reader._on_message(delivery(5, 1, 99))
        await reader.next(True)
        waiting = asyncio.create_task(reader.next(True))
        await asyncio.sleep(0.01)
        waiting.cancel()
        return js._nc.acks

    assert asyncio.run(run()) == [reply(5, 1, 99)]


def test_a_lost_delivery_ends_the_read_instead_of_leaving_a_gap():
    async def run():
        reader = await started(FakeJetStream(num_pending=10))
        await reader._on_message(delivery(5, 1, 9))
        await reader._on_message(delivery(7, 3, 7))  # consumer seq 2 never arrived
        await reader.next(True)

    with pytest.raises(StreamInterrupted):
        asyncio.run(run())


def test_a_heartbeat_reporting_more_than_we_got_ends_the_read():
    async def run():
        reader = await started(FakeJetStream(num_pending=10))
        await reader._on_message(delivery(5, 1, 9))
        assert [e.stream_seq for e in await reader.next(True)] == [5]
        await reader._on_message(heartbeat(1))  # in step: fine
        assert reader.error is None
        await reader._on_message(heartbeat(3))
        await reader.next(True)

    with pytest.raises(StreamInterrupted):
        asyncio.run(run())


def test_a_redelivery_is_not_handed_out_twice_and_excluded_types_are_left_out():
    async def run():
        reader = await started(FakeJetStream(num_pending=10), exclude=frozenset({"AgentOutput"}))
        await reader._on_message(delivery(5, 1, 3, kind="TaskSubmitted"))
        await reader._on_message(delivery(6, 2, 2))
        await reader._on_message(delivery(5, 3, 2, kind="TaskSubmitted", delivered=2))  # redelivered
        await reader._on_message(delivery(7, 4, 1, data=b"not an envelope"))
        await reader._on_message(delivery(8, 5, 0, kind="TaskCompleted"))
        return await reader.next(False), await reader.next(False)

    got, end = asyncio.run(run())
    assert [(e.stream_seq, e.type) for e in got] == [(5, "TaskSubmitted"), (8, "TaskCompleted")]
    assert end is None


def test_a_consumer_not_created_as_asked_is_refused():
    js = FakeJetStream(num_pending=0, alter=lambda c: replace(c, max_ack_pending=20_000))

    with pytest.raises(RuntimeError, match="not as asked"):
        asyncio.run(started(js))
    assert js.deleted == ["C1"]


def test_batched_messages_are_json_arrays_in_order_and_bounded_in_size(monkeypatch):
    events = [RawEvent(i, "AgentOutput", b'{"event_id":"e%d","stream_seq":%d}' % (i, i)) for i in range(1, 8)]
    assert [e["stream_seq"] for e in json.loads(next(routes._arrays(events)))] == list(range(1, 8))

    monkeypatch.setattr(routes, "BATCH_MESSAGE_BYTES", 70)
    messages = [json.loads(m) for m in routes._arrays(events)]
    assert all(1 <= len(m) <= 2 for m in messages)
    assert [e["stream_seq"] for m in messages for e in m] == list(range(1, 8))
    monkeypatch.setattr(routes, "BATCH_MESSAGE_BYTES", 1)
    assert [len(json.loads(m)) for m in routes._arrays(events)] == [1] * 7
