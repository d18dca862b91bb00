"""`Bus.publish_batch` against a real nats-server: what lands on the stream, dedup, failed acks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from events import STREAM, AgentOutput, Envelope, envelope_for
from services.runtime.bus import Bus, Outgoing
from services.runtime.relay import outgoing_of


def outputs(n: int, task_id: str = "t1") -> list[Envelope]:
    return [envelope_for(AgentOutput(seq=i + 1, stream="stdout", text=f"line {i} ✓\n"), task_id=task_id,
                         actor="agent:shell") for i in range(n)]


async def stored(bus: Bus) -> list[tuple[dict, bytes]]:
    last = (await bus.js.stream_info(STREAM)).state.last_seq
    found = []
    for seq in range(1, last + 1):
        message = await bus.js.get_msg(STREAM, seq)
        found.append((message.headers, message.data))
    return found


@pytest.mark.parametrize("writer", ["one write (nats-py's private writer)", "nats-py's public publish"])
async def test_a_batch_lands_in_order_with_its_ids_and_a_resent_batch_is_stored_once(
    bus: Bus, writer: str, monkeypatch: pytest.MonkeyPatch
):
    if writer.startswith("nats-py's public"):
        monkeypatch.setattr("services.runtime.bus.has_writer_api", lambda nc: False)  # The fast path off.
    envelopes = outputs(600)
    messages = [outgoing_of(SimpleNamespace(envelope=e.model_dump(mode="json"))) for e in envelopes]
    await bus.publish_batch(messages[:400])
    await bus.publish_batch(messages[200:])  # At least once: half of it again.
    on_stream = await stored(bus)
    assert [Envelope.from_json(data) for _, data in on_stream] == envelopes
    assert [headers["Nats-Msg-Id"] for headers, _ in on_stream] == [e.event_id for e in envelopes]
    assert all(headers["Nats-Expected-Stream"] == STREAM for headers, _ in on_stream)


async def test_envelopes_are_published_as_they_are(bus: Bus):
    [envelope] = outputs(1)
    await bus.publish_batch([envelope])
    [(headers, data)] = await stored(bus)
    assert data == envelope.to_json() and headers["Nats-Msg-Id"] == envelope.event_id


async def test_a_message_no_stream_takes_fails_the_batch(bus: Bus):
    [good] = outputs(1)
    nowhere = Outgoing("not.a.baton.subject", "e-nowhere", b"{}")
    with pytest.raises(Exception, match="not acknowledged"):
        await bus.publish_batch([good.model_copy(), nowhere])
    # The bus still works afterwards.
    await bus.publish_batch(outputs(2, task_id="t2"))
    assert len(await stored(bus)) == 3


async def test_unsafe_subjects_and_ids_are_refused_before_anything_is_sent(bus: Bus):
    with pytest.raises(ValueError):
        await bus.publish_batch([Outgoing("baton.task.t1.X", "id\r\nPUB x 1", b"{}")])
    with pytest.raises(ValueError):
        await bus.publish_batch([Outgoing("baton.task.t1 X", "id", b"{}")])
    assert (await bus.js.stream_info(STREAM)).state.messages == 0
