"""Handling an event once: what a service's consumers do with each message they read.

(How they read the stream, a partition at a time in each task's order, is `partitions`.) A
handler records its new events together with the message's tracking position
(`Tracking(consumer, stream_seq)`) in one transaction, so a redelivered message is recognised
and changes nothing; one that cannot be handled is dead-lettered and the consumer moves on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from eventsourcing.persistence import IntegrityError, Tracking
from nats.aio.msg import Msg
from pydantic import ValidationError

from events import Envelope, stored_subject
from events.versions import MissingUpcaster, current_shape
from services.runtime.bus import DEAD_LETTER_PREFIX, DEAD_LETTER_STREAM, Bus
from services.runtime.nats_fast_path import ack_all
from services.runtime.logs import log_context
from services.runtime.pinned_pull import ConsumerSetupError

__all__ = ["ConsumerSetupError", "Subscription", "ack_all", "run_all"]

log = logging.getLogger(__name__)

MAX_DELIVER = 5
"""A message delivered more often than this (the process died handling it) is dead-lettered."""
ACK_WAIT_S = 10.0
"""Short, so a message a killed process was handling is redelivered soon after its restart;
a handler that runs longer keeps its message alive with `in_progress` (KEEPALIVE_S)."""
KEEPALIVE_S = 2.0
RETRY_DELAYS_S = (0.2, 1.0, 3.0)
"""In-place retries of a failing handler before its message is dead-lettered."""
CONFLICT_RETRY_S = 60.0
"""How long a handler that lost a race for an aggregate is retried (another replica saved a new
version of it first: `IntegrityError`), each time after a random 20–300 ms: such a loss is
resolved by reading the aggregate again, and many replicas racing for one (the task runner's
queue, a burst of 200 tasks) can lose more than RETRY_DELAYS_S allows."""

FETCH_BATCH = 500
"""Messages asked for per fetch: a backlog (a chatty agent's output) is read, handled in one
transaction and acked in a few large steps, not in many small ones."""

Handler = Callable[[Envelope, Tracking], Awaitable[None]]
BatchHandler = Callable[[list[tuple[Envelope, Tracking]]], Awaitable[None]]
"""Handles a run of events in stream order in one transaction (read models keeping up)."""


class TrackingStore(Protocol):
    def is_processed(self, tracking: Tracking) -> bool: ...
    def save_processed(self, tracking: Tracking, *aggregates: object) -> None: ...


ALL_EVENTS = "*"
"""A subscription to every event of every task, in stream order (e.g. the audit log)."""


@dataclass(frozen=True)
class Subscription:
    """`handle` runs for every event of `event_type` (or of every type: ALL_EVENTS), across all
    tasks; `handle_batch`, when a service's subscriptions share one, takes runs of them."""

    event_type: str
    handle: Handler
    handle_batch: BatchHandler | None = None


class MisroutedEnvelope(ValueError):
    """An envelope whose task or type is not the one its subject names."""


def envelope_on_its_subject(message: Msg) -> Envelope:
    """The message's envelope, only if it says what its subject says: the bus lets a credential
    publish only on its own subjects (a vm_agent: its own task's), so an envelope claiming
    another task or type than its subject is forged and is never acted on. Its `data` is in its
    type's current shape (`current_shape`), so no handler reads an old version's fields."""
    envelope = Envelope.from_json(message.data)
    if message.subject != stored_subject(envelope.task_id, envelope.type):
        raise MisroutedEnvelope(
            f"misrouted envelope: it says {envelope.type} of task {envelope.task_id} but was "
            f"published on {message.subject}; not acted on")
    return current_shape(envelope)


Pulse = Callable[[], Awaitable[None]]
"""Called every KEEPALIVE_S while a handler runs: keeps the messages (and the reader's pin) alive."""


async def _process_batch(
    bus: Bus, durable: str, messages: list[Msg], handle: Handler, handle_batch: BatchHandler,
    store: TrackingStore, pulse: Pulse | None = None,
) -> None:
    """Apply a fetched batch in one transaction; if that fails, fall back to one at a time
    (which retries, and dead-letters only the message that cannot be handled)."""
    items = []
    for message in messages:
        tracking = Tracking(durable, stream_seq(message))
        try:
            items.append((envelope_on_its_subject(message), tracking))
        except (ValidationError, ValueError, MissingUpcaster):
            break  # Undecodable, unreadable or misrouted: leave it and what follows to the one-at-a-time path.
    fresh = _unprocessed(store, items)
    try:
        if fresh:
            await handle_batch(fresh)
    except Exception as error:
        log.warning("consumer %s: batch of %d failed (%r); handling one at a time", durable, len(fresh), error)
        items = []
    await ack_all(messages[: len(items)])
    _log_handled(durable, fresh if items else [])
    for message in messages[len(items):]:
        await _process(bus, durable, message, handle, store, pulse=pulse)


def _log_handled(durable: str, items: list[tuple[Envelope, Tracking]]) -> None:
    """At debug level, one line per event handled: which consumer, task, type and stream seq
    (what a test reads to see each service took each task's events in stream order)."""
    if log.isEnabledFor(logging.DEBUG):
        for envelope, tracking in items:
            log.debug("handled %s of %s", envelope.type, envelope.task_id, extra={"fields": {
                "consumer": durable, "handled_task": envelope.task_id, "handled_type": envelope.type,
                "stream_seq": tracking.notification_id}})


def stream_seq(message: Msg) -> int:
    """The message's stream sequence, read straight from its ack subject when that has the
    common form `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.
    <pending>` (nats-py's `metadata` builds dataclasses and a datetime for it)."""
    reply = getattr(message, "reply", None)
    if reply and reply.startswith("$JS.ACK."):
        tokens = reply.split(".")
        if len(tokens) == 9:
            return int(tokens[5])
    return message.metadata.sequence.stream


def _unprocessed(store: TrackingStore, items: list[tuple[Envelope, Tracking]]) -> list[tuple[Envelope, Tracking]]:
    """The items not yet processed. A position is a high-water mark, so for a run in stream
    order the first and the last item tell (one or two queries instead of one per item)."""
    positions = [tracking.notification_id for _, tracking in items]
    if len(items) > 1 and all(a < b for a, b in zip(positions, positions[1:])):
        if not store.is_processed(items[0][1]):
            return items
        if store.is_processed(items[-1][1]):
            return []
    fresh, highest = [], 0
    for envelope, tracking in items:  # As one at a time would: once 9 is handled, 8 counts as done.
        if tracking.notification_id > highest and not store.is_processed(tracking):
            fresh.append((envelope, tracking))
        highest = max(highest, tracking.notification_id)
    return fresh


async def _process(
    bus: Bus, durable: str, message: Msg, handle: Handler, store: TrackingStore,
    *, retry_delays_s: Sequence[float] | None = None, pulse: Pulse | None = None,
) -> None:
    """Handle one message exactly once, or dead-letter it; either way the consumer moves on.

    Positions are a high-water mark per consumer, so messages are handled strictly in
    stream order: a failing handler is retried here, never nak'd behind later messages.
    """
    tracking = Tracking(durable, message.metadata.sequence.stream)
    if store.is_processed(tracking):
        await message.ack()
        return
    if message.metadata.num_delivered > MAX_DELIVER:
        # Delivered again and again without an ack: the handler keeps killing the process.
        await _give_up(bus, durable, message, store, tracking,
                       f"delivered {message.metadata.num_delivered} times without being handled")
        return
    try:
        envelope = envelope_on_its_subject(message)
    except MisroutedEnvelope as error:
        await _give_up(bus, durable, message, store, tracking, str(error))
        return
    except (ValidationError, ValueError) as error:
        await _give_up(bus, durable, message, store, tracking, f"undecodable envelope: {error}")
        return
    except MissingUpcaster as error:
        await _give_up(bus, durable, message, store, tracking, str(error))
        return
    delays = iter((*(RETRY_DELAYS_S if retry_delays_s is None else retry_delays_s), None))
    conflicts_until = asyncio.get_running_loop().time() + CONFLICT_RETRY_S
    while True:
        try:
            await _handle_keeping_alive(message, handle, envelope, tracking, pulse)
            break
        except Exception as error:
            if isinstance(error, IntegrityError) and asyncio.get_running_loop().time() < conflicts_until:
                log.info("consumer %s lost a race for an aggregate on %s; retrying", durable, envelope.event_id)
                delay_s: float | None = random.uniform(0.02, 0.3)
            else:
                log.exception("consumer %s failed on %s", durable, envelope.event_id)
                delay_s = next(delays)
            if delay_s is None:
                await _give_up(bus, durable, message, store, tracking, repr(error))
                return
            await message.in_progress()
            if pulse is not None:
                await pulse()
            await asyncio.sleep(delay_s)
    if not store.is_processed(tracking):
        store.save_processed(tracking)
    await message.ack()
    _log_handled(durable, [(envelope, tracking)])


async def _handle_keeping_alive(message: Msg, handle: Handler, envelope: Envelope, tracking: Tracking,
                                pulse: Pulse | None = None) -> None:
    """Run the handler; while it runs, tell JetStream every few seconds not to redeliver yet
    (and `pulse`, so the reader keeps its pin and the messages it holds)."""
    with log_context(task_id=envelope.task_id, event_id=envelope.event_id):  # the handler's lines say which
        handling = asyncio.ensure_future(handle(envelope, tracking))
    try:
        while not (await asyncio.wait({handling}, timeout=KEEPALIVE_S))[0]:
            await message.in_progress()
            if pulse is not None:
                await pulse()
    finally:
        handling.cancel()
    handling.result()


async def _give_up(
    bus: Bus, durable: str, message: Msg, store: TrackingStore, tracking: Tracking, error: str
) -> None:
    await dead_letter(bus, durable, message, error)
    store.save_processed(tracking)
    await message.ack()


DEAD_LETTER_DATA_BYTES = 64 * 1024


async def dead_letter(bus: Bus, durable: str, message: Msg, error: str) -> None:
    """Park a message that cannot be handled where people can see it; never block on it."""
    log.error("dead-lettering stream seq %s from %s: %s", message.metadata.sequence.stream, durable, error)
    body = {
        "consumer": durable,
        "stream_seq": message.metadata.sequence.stream,
        "subject": message.subject,
        "error": error,
        # At most 64 KiB of it: the record must fit the bus even when the message barely did.
        "data": message.data[:DEAD_LETTER_DATA_BYTES].decode(errors="replace"),
        "size": len(message.data),
    }
    await bus.js.publish(f"{DEAD_LETTER_PREFIX}.{durable}", json.dumps(body).encode(),
                         stream=DEAD_LETTER_STREAM)


RECANCEL_S = 0.1
"""While stopping, a loop still running after this long is cancelled again (see `run_all`)."""


async def run_all(*tasks: Awaitable[None]) -> None:
    """Run a service's long-lived loops; if one dies the process exits (its supervisor restarts
    it); when cancelled, stop them all, promptly.

    A loop still running shortly after its cancellation is cancelled again until it ends: a
    library may swallow one cancellation (Python 3.11's `asyncio.wait_for` does when what it
    waits for completes at the same moment), and a stop must not wait on that.
    """
    running = [asyncio.ensure_future(t) for t in tasks]
    try:
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_EXCEPTION)
        for finished in done:
            finished.result()
    finally:
        pending = {task for task in running if not task.done()}
        while pending:
            for task in pending:
                task.cancel()
            try:
                _, pending = await asyncio.wait(pending, timeout=RECANCEL_S)
            except asyncio.CancelledError:
                pass  # Cancelled again while stopping (an enclosing run_all): stop them all first.
        for task in running:  # Retrieve each outcome: no "exception was never retrieved".
            if not task.cancelled():
                task.exception()


def subscriptions_for(handlers: dict[str, Handler]) -> Sequence[Subscription]:
    return [Subscription(event_type, handle) for event_type, handle in handlers.items()]
