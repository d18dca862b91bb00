"""Reading events from the stream in order: a task's history, or history then the live tail.

Each reader is its own ephemeral JetStream consumer starting at a stream sequence, so the
switch from history to live has no gap and no duplicate.

The consumer pushes to the reader's inbox (no pull round trips), and its `max_ack_pending` is
the back-pressure: JetStream delivers at most `window` events the reader has not yet taken,
and the reader acknowledges (AckAll) only what its caller has taken. A slow viewer slows its
own consumer, the gateway holds at most `window` events per reader, and JetStream is the
buffer. Each delivery's consumer sequence is checked, and the idle heartbeats say what was
sent last: any event lost on the way (a reconnect, a consumer gone) ends the read with
`StreamInterrupted` rather than leaving a gap; the reader resumes from the last stream_seq + 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from events import STREAM
from services.runtime.nats_fast_path import connection_of

log = logging.getLogger(__name__)

_ENVELOPE_START = b'{"event_id":'
_HEARTBEAT_S = 5.0
# No message and no heartbeat for this long while waiting: the consumer or the connection is gone.
_SILENCE_S = 3 * _HEARTBEAT_S + 1.0
# Far longer than any viewer takes to send one window: no redelivery in practice (and a
# redelivered event would be skipped by its stream sequence anyway).
_ACK_WAIT_S = 22 * 3600.0


class RawEvent(NamedTuple):
    """One event as stored, with `"stream_seq"` spliced into its JSON (no decode, no re-encode)."""

    stream_seq: int
    type: str
    json: bytes


class StreamInterrupted(Exception):
    """The read cannot go on without a gap; resume from the last stream_seq + 1."""


async def stream_raw(
    js: JetStreamContext,
    subject: str | list[str],
    *,
    from_seq: int = 1,
    follow: bool = True,
    batch: int = 1000,
    exclude: frozenset[str] = frozenset(),
) -> AsyncIterator[list[RawEvent]]:
    """Batches of events on `subject` from `from_seq` on, in order, each at most `batch` long.

    With `follow=False` it ends once the history is read; otherwise it waits for new events.
    Events whose type is in `exclude` are left out; a list of subjects is filtered by JetStream
    (what it leaves out never reaches the reader). At most `batch` events are held at a time
    (the consumer's `max_ack_pending`): the next ones come as the caller takes these.
    """
    reader = _Reader(js, subject, window=max(batch, 2), exclude=exclude)
    await reader.start(max(from_seq, 1))
    try:
        while True:
            events = await reader.next(follow)
            if events is None:
                return
            if events:
                yield events
    finally:
        await reader.close()


async def stream_events(
    js: JetStreamContext, subject: str | list[str], *, from_seq: int = 1, follow: bool = True, batch: int = 1000
) -> AsyncIterator[list[dict[str, Any]]]:
    """Like stream_raw, as decoded envelopes (each with its `stream_seq`)."""
    async for raw in stream_raw(js, subject, from_seq=from_seq, follow=follow, batch=batch):
        yield [json.loads(event.json) for event in raw]


def _ack_fields(reply: str) -> tuple[int, int, bool]:
    """(stream seq, consumer seq, nothing pending) from a delivery's ack subject,
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` (or the longer form
    with a domain and an account hash after `$JS.ACK`): one split, no `Msg.metadata`."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[6]), tokens[8] == "0"
    if len(tokens) >= 11 and tokens[1] == "ACK":
        return int(tokens[7]), int(tokens[8]), tokens[10] == "0"
    raise ValueError(f"not a JetStream delivery: {reply!r}")


class _Reader:
    """One ephemeral push consumer with a bounded window, and what it delivered so far."""

    def __init__(self, js: JetStreamContext, subject: str | list[str], *, window: int,
                 exclude: frozenset[str]) -> None:
        self.js = js
        self.nc = connection_of(js)
        self.subject = subject
        self.window = window
        self.exclude = exclude
        # Acknowledge once this many deliveries were taken (and whenever nothing is left to
        # take), so JetStream keeps most of the window in flight.
        self.ack_every = max(window // 4, 1)
        self.buffer: list[RawEvent] = []
        self.ready = asyncio.Event()
        self.error: Exception | None = None
        self.last_sseq = 0  # stream seq of the last event delivered (kept or excluded)
        self.last_cseq = 0  # consumer seq of the last delivery, and its ack subject
        self.last_reply = ""
        self.drained = False  # JetStream had nothing more for us after the last delivery
        self.must_see = 0  # deliveries JetStream had made when it described the new consumer
        self.handed_cseq = 0  # the last delivery in (or before) the batch last handed out
        self.handed_reply = ""
        self.acked_cseq = 0
        self.heard = True  # a message or a heartbeat came since the last look
        self.sub: Any = None
        self.consumer: str | None = None

    async def start(self, from_seq: int) -> None:
        inbox = self.nc.new_inbox()
        # Subscribed before the consumer exists, so nothing it pushes goes unheard. Unbounded
        # queue, but never more than `window` deliveries in it: JetStream waits for our acks.
        self.sub = await self.nc.subscribe(inbox, cb=self._on_message,
                                           pending_msgs_limit=0, pending_bytes_limit=0)
        config = ConsumerConfig(
            deliver_subject=inbox,
            filter_subject=self.subject if isinstance(self.subject, str) else None,
            filter_subjects=None if isinstance(self.subject, str) else self.subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=from_seq,
            ack_policy=AckPolicy.ALL,
            max_ack_pending=self.window,
            ack_wait=_ACK_WAIT_S,
            idle_heartbeat=_HEARTBEAT_S,
            inactive_threshold=60.0,
            mem_storage=True,
        )
        try:
            info = await self.js.add_consumer(STREAM, config=config)
        except BaseException:
            await self._unsubscribe()
            raise
        self.consumer = info.name
        got = info.config
        if got.max_ack_pending != self.window or got.ack_policy != AckPolicy.ALL or got.deliver_subject != inbox:
            await self.close()
            raise RuntimeError(f"JetStream created the reader's consumer as {got}, not as asked")
        # The consumer may already have pushed some (maybe all) of the history when it answered:
        # the end of the history is then told by the deliveries, not by this answer.
        self.must_see = info.delivered.consumer_seq if info.delivered else 0
        if self.last_cseq == 0:
            self.drained = not info.num_pending

    async def _on_message(self, message: Msg) -> None:
        """Every message on the inbox, in arrival order (nats-py's delivery task for the subscription)."""
        reply = message.reply
        self.heard = True
        if not reply:
            self._on_status(message)
            return
        if not reply.startswith("$JS.ACK."):
            return  # A flow-control request: not asked for, nothing to answer.
        try:
            sseq, cseq, drained = _ack_fields(reply)
        except ValueError:
            return self._fail(StreamInterrupted(f"unexpected delivery subject {reply!r}"))
        if cseq != self.last_cseq + 1:
            return self._fail(StreamInterrupted(
                f"delivery {cseq} after {self.last_cseq} on {self.subject}: some were lost"))
        self.last_cseq, self.last_reply, self.drained = cseq, reply, drained
        if sseq > self.last_sseq:  # else a redelivery of what we already have
            self.last_sseq = sseq
            kind = message.subject.split(".", 4)[3]  # baton.task.<task>.<type>.<partition>
            if kind not in self.exclude:
                data = message.data
                # Relays publish pydantic's JSON, event_id first; anything else is not an event.
                if data.startswith(_ENVELOPE_START) and data.endswith(b"}"):
                    self.buffer.append(RawEvent(sseq, kind, b'%s,"stream_seq":%d}' % (data[:-1], sseq)))
                    self.ready.set()
                    return
                log.warning("skipping a message that is not an envelope at stream seq %s", sseq)
        # Nothing to hand out, but the reader must wake to ack (or to see the end) eventually.
        if drained or cseq - self.acked_cseq >= self.ack_every:
            self.ready.set()

    def _on_status(self, message: Msg) -> None:
        headers = message.headers or {}
        last = headers.get("Nats-Last-Consumer")
        # An idle heartbeat says what the consumer delivered last: more than we got is a gap.
        if last is not None and int(last) > self.last_cseq:
            self._fail(StreamInterrupted(
                f"JetStream delivered up to {last} on {self.subject}, we got {self.last_cseq}: some were lost"))

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.ready.set()

    async def next(self, follow: bool) -> list[RawEvent] | None:
        """What was delivered since the last call (waiting for some if there is none), or None
        at the end of the history when not following. Calling it again means the caller is
        done with what it got."""
        if self.handed_cseq - self.acked_cseq >= self.ack_every:
            await self._ack(self.handed_cseq, self.handed_reply)
        while True:
            if self.error is not None:
                raise self.error
            if self.buffer:
                events, self.buffer = self.buffer, []
                self.ready.clear()
                self.handed_cseq, self.handed_reply = self.last_cseq, self.last_reply
                return events
            # Everything delivered so far is taken (or left out).
            if not follow and self.drained and self.last_cseq >= self.must_see:
                return None
            if self.last_cseq > self.acked_cseq:
                await self._ack(self.last_cseq, self.last_reply)
            self.ready.clear()
            self.heard = False
            try:
                await asyncio.wait_for(self.ready.wait(), _SILENCE_S)
            except TimeoutError:
                if not self.heard:
                    raise StreamInterrupted(
                        f"no message and no heartbeat on {self.subject} for {_SILENCE_S:.0f}s") from None

    async def _ack(self, cseq: int, reply: str) -> None:
        # AckAll: this acknowledges every delivery up to this one.
        await self.nc.publish(reply)
        self.acked_cseq = cseq

    async def _unsubscribe(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None

    async def close(self) -> None:
        await self._unsubscribe()
        if self.consumer is not None:
            name, self.consumer = self.consumer, None
            # The consumer also goes by itself once nobody listens (inactive_threshold).
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(STREAM, name)

