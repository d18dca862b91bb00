"""The NATS JetStream adapter: connect, check the stream, publish envelopes."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client, Credentials
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig, SubjectTransform
from nats.js.errors import NotFoundError

from events import STREAM, Envelope, stored_subject
from events.envelope import STREAM_SUBJECTS, SUBJECT_TRANSFORM
from events.versions import current_shape

from services.runtime.nats_fast_path import has_writer_api, send_commands
from services.runtime.settings import nats_server_urls

if TYPE_CHECKING:
    from services.runtime.settings import Settings

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_S = 30 * 60
"""How long JetStream remembers a Nats-Msg-Id: a relay that re-sends within it stores nothing twice."""


class Unpublishable(Exception):
    """The bus refuses the message `event_id` for a reason a retry will not change (bigger than
    the bus's max payload, a subject this connection may not publish to, refused by the stream).

    Raised by `Bus.publish_batch` for the first such message of a batch; the relay sets it aside
    (dead-letters it) and goes on."""

    def __init__(self, event_id: str, reason: str) -> None:
        self.event_id = event_id
        self.reason = reason
        super().__init__(f"event {event_id} cannot be published: {reason}")


class StreamSetupError(RuntimeError):
    """The stream exists but its read-back configuration is not what Baton needs."""

    def __init__(self, mismatches: dict[str, tuple[object, object]], *, hint: str = "") -> None:
        self.mismatches = mismatches
        detail = ", ".join(f"{k}: wanted {w!r}, got {g!r}" for k, (w, g) in mismatches.items())
        super().__init__(f"stream {STREAM} is misconfigured ({detail}){hint}")


@dataclass
class Bus:
    """A connection to NATS and its JetStream context."""

    nc: Client
    js: JetStreamContext
    _acks: _BatchAcks | None = field(default=None, repr=False)
    _denials: PublishDenials = field(default_factory=lambda: PublishDenials(), repr=False)

    async def publish(self, envelope: Envelope) -> int:
        """Publish and wait for the stream's ack; returns the stream sequence."""
        ack = await self.js.publish(
            envelope.subject,
            envelope.to_json(),
            stream=STREAM,
            headers={"Nats-Msg-Id": envelope.event_id},
        )
        return ack.seq

    async def last_event(self, task_id: str, event_type: str) -> Envelope | None:
        """The task's most recent event of `event_type` on the stream, if any, in its type's
        current shape (`current_shape`)."""
        try:
            message = await self.js.get_last_msg(STREAM, stored_subject(task_id, event_type))
        except NotFoundError:
            return None
        return current_shape(Envelope.from_json(message.data))

    async def publish_batch(self, messages: Sequence[Outgoing | Envelope]) -> None:
        """Publish in order, then wait for every ack (one round trip for the batch).

        Each message goes out with `Nats-Msg-Id` (its event id) and `Nats-Expected-Stream`,
        as `js.publish` would send it; raises if any ack is missing or an error.
        """
        if not messages:
            return
        if self._acks is None:
            self._acks = _BatchAcks(self.nc)
            self._denials.listeners.append(self._acks.publish_denied)
        await self._acks.publish(messages)

    async def publish_dead_letter(self, subject: str, body: dict[str, Any], *, msg_id: str) -> None:
        """Park `body` (small JSON, for people) on the dead-letter stream; deduplicated by `msg_id`."""
        await self.js.publish(subject, json.dumps(body).encode(), stream=DEAD_LETTER_STREAM,
                              headers={"Nats-Msg-Id": msg_id})


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An envelope ready for the bus: its subject, its event id (the Nats-Msg-Id) and its JSON."""

    subject: str
    event_id: str
    payload: bytes

    def to_json(self) -> bytes:
        return self.payload


PUBLISH_ACK_TIMEOUT_S = 10.0
_SAFE_TOKEN = re.compile(r"[!-~]+")  # printable ASCII, no spaces: safe in a protocol line
_HEADERS = b"NATS/1.0\r\nNats-Expected-Stream: " + STREAM.encode() + b"\r\nNats-Msg-Id: "


class _BatchAcks:
    """Publishes a batch as one write of pre-built HPUB commands, with JetStream's acks
    collected by one wildcard inbox subscription.

    nats-py's `publish_async` costs a NUID, a future, a semaphore and a header dict per
    message; here a batch costs one reply prefix, one future and one write, and an ack costs
    one callback. Acks of an abandoned batch (timed out) are told apart by their batch number.
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = f"{nc.new_inbox()}."
        self._sub: Any = None
        self._batches: dict[str, _Batch] = {}
        self._next = 0

    async def publish(self, messages: Sequence[Outgoing | Envelope]) -> None:
        nc = self._nc
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if not nc.is_connected:
            raise ConnectionError("not connected to NATS (reconnecting)")
        if self._sub is None:
            self._sub = await nc.subscribe(self._prefix + "*.*", cb=self._on_ack)
        self._next += 1
        name = str(self._next)
        reply = f"{self._prefix}{name}."
        batch = _Batch([(m.subject, m.event_id) for m in messages])
        commands = []
        max_payload = nc.max_payload
        for index, message in enumerate(messages):
            payload = message.to_json()
            subject, event_id = message.subject, message.event_id
            if not (_SAFE_TOKEN.fullmatch(subject) and _SAFE_TOKEN.fullmatch(event_id)):
                raise ValueError(f"cannot publish subject {subject!r} with id {event_id!r}")
            headers = b"%s%s\r\n\r\n" % (_HEADERS, event_id.encode())
            if len(payload) + len(headers) > max_payload:
                raise Unpublishable(event_id, f"{len(payload) + len(headers)} bytes with its headers, "
                                              f"over the bus's max payload of {max_payload} bytes")
            commands.append(b"HPUB %s %s%d %d %d\r\n%s%s\r\n" % (
                subject.encode(), reply.encode(), index, len(headers), len(headers) + len(payload),
                headers, payload))
        self._batches[name] = batch
        try:
            if has_writer_api(nc):
                await send_commands(nc, b"".join(commands))
            else:  # A nats-py without that private API: the same messages, one public call each.
                for index, message in enumerate(messages):
                    await nc.publish(message.subject, message.to_json(), reply=f"{reply}{index}", headers={
                        "Nats-Expected-Stream": STREAM, "Nats-Msg-Id": message.event_id})
            async with asyncio.timeout(PUBLISH_ACK_TIMEOUT_S):
                await batch.done
        finally:
            self._batches.pop(name, None)

    async def _on_ack(self, msg: Any) -> None:
        _, _, tail = msg.subject.rpartition(self._prefix)
        name, _, index = tail.partition(".")
        batch = self._batches.get(name)
        if batch is None or batch.done.done():
            return  # A batch given up on (timed out, failed): its caller publishes again.
        data = msg.data
        if not data.startswith(b'{"stream"') or b'"error"' in data:
            batch.done.set_exception(_ack_error(data, (msg.headers or {}).get("Status"), batch, index))
            return
        if index not in batch.acked:
            batch.acked.add(index)
            if len(batch.acked) == batch.size:
                batch.done.set_result(None)


    def publish_denied(self, subject: str) -> None:
        """The server refused a publish to `subject` (lower-cased, as nats-py reports it): the
        batches waiting for its ack fail now, naming their first message on it."""
        for batch in self._batches.values():
            event_id = next((i for s, i in batch.messages if s.lower() == subject), None)
            if event_id is not None and not batch.done.done():
                batch.done.set_exception(Unpublishable(
                    event_id, f"this connection may not publish to {subject!r} (permissions violation)"))


_REFUSED_FOR_GOOD = frozenset({10054})
"""JetStream error codes a retry will not change: 10054 = the message is over the stream's max_msg_size."""


def _ack_error(data: bytes, status: str | None, batch: _Batch, index: str) -> Exception:
    """What a negative publish ack means: Unpublishable when retrying cannot help, else an error to retry."""
    try:
        error = json.loads(data)["error"]
        code, description = error.get("err_code"), error.get("description", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        code, description = None, ""
    if code in _REFUSED_FOR_GOOD and index.isdigit() and int(index) < batch.size:
        return Unpublishable(batch.messages[int(index)][1], f"the stream refused it: {description}")
    return nats.js.errors.Error(f"publish not acknowledged: {status or data[:200]!r}")


class _Batch:
    __slots__ = ("acked", "done", "messages", "size")

    def __init__(self, messages: list[tuple[str, str]]) -> None:
        self.messages = messages  # (subject, event id) of each, in order
        self.size = len(messages)
        self.acked: set[str] = set()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


DEAD_LETTER_STREAM = "BATON_DEADLETTER"
DEAD_LETTER_PREFIX = "baton.deadletter"


def relay_dead_letter_subject(service: str) -> str:
    """Where a service's relay parks an event the bus will never take."""
    return f"{DEAD_LETTER_PREFIX}.relay.{service}"


def vm_agent_dead_letter_subject(task_id: str) -> str:
    """Where a vm_agent's relay parks an event the bus will never take: the one dead-letter
    subject a vm_agent's credential may publish to."""
    return f"{DEAD_LETTER_PREFIX}.vm_agent.{task_id}"


_PERMISSION_DENIED = re.compile(r'permissions violation for publish to "?([^"\s]+)')


class PublishDenials:
    """Hears the server's asynchronous "permissions violation for publish" errors (a refused
    publish gets no ack, only that error) and tells the listeners which subject was refused."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[str], None]] = []

    async def on_error(self, error: Exception) -> None:
        """nats-py's `error_cb`."""
        log.warning("nats: %s", error)
        denied = _PERMISSION_DENIED.search(str(error))
        if denied:
            for listener in self.listeners:
                listener(denied.group(1))


def dead_letter_stream_config() -> StreamConfig:
    """Messages no consumer could handle, with the error, kept for people to inspect."""
    return StreamConfig(
        name=DEAD_LETTER_STREAM,
        subjects=[f"{DEAD_LETTER_PREFIX}.>"],
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        max_msgs=100_000,
    )


@dataclass(frozen=True)
class StreamLimits:
    """How much of the event stream NATS keeps, oldest dropped first (the stores stay the record).

    `max_bytes` -1 and `max_age_s` 0 mean no limit; `max_msg_size` -1 means the server's own.
    `replicas`: copies of the stream in a cluster; 0 means 3 on a cluster and 1 on a single server
    (decided when the stream is created, kept after)."""

    max_bytes: int = -1
    max_age_s: float = 0.0
    max_msg_size: int = -1
    replicas: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamLimits:
        return cls(max_bytes=settings.stream_max_bytes, max_age_s=settings.stream_max_age_s)

    @classmethod
    def of(cls, config: StreamConfig) -> StreamLimits:
        """The limits a stream's (read-back) configuration holds."""
        return cls(max_bytes=config.max_bytes if config.max_bytes is not None else -1,
                   max_age_s=float(config.max_age or 0),
                   max_msg_size=config.max_msg_size if config.max_msg_size is not None else -1,
                   replicas=config.num_replicas or 1)


def stream_config(limits: StreamLimits = StreamLimits()) -> StreamConfig:
    return StreamConfig(
        name=STREAM,
        subjects=list(STREAM_SUBJECTS),
        storage=StorageType.FILE,
        retention=RetentionPolicy.LIMITS,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_bytes=limits.max_bytes,
        max_age=limits.max_age_s,
        max_msg_size=limits.max_msg_size,
        num_replicas=limits.replicas or CLUSTER_REPLICAS,
        # Stored as baton.task.<task>.<type>.<partition>: consumers take a partition each.
        subject_transform=SubjectTransform(src=SUBJECT_TRANSFORM[0], dest=SUBJECT_TRANSFORM[1]),
    )


CLUSTER_REPLICAS = 3
"""Copies of the event stream on a cluster: a quorum (2 of 3) holds every acknowledged event."""
_NOT_CLUSTERED = 10074
"""JetStream's error code for 'replicas > 1 not supported in non-clustered mode'."""


ELECTION_WAIT_S = 30.0
"""How long opening the bus waits out a cluster electing a stream's leader (a node just died)."""


class StreamLeaderless(Exception):
    """The stream has no leader right now: its cluster is electing one."""


_NO_PEERS = 10005
"""JetStream's error code for 'no suitable peers for placement'."""


class PeersMissing(Exception):
    """Too few of the cluster's JetStream servers are up (or have joined yet) to place the stream's
    copies: a cluster still forming, or a node down while the stream is created or changed."""


JETSTREAM_UNAVAILABLE = (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                         nats.js.errors.ServiceUnavailableError)
"""What a JetStream request meets while a node dies or a leader is elected (503: "JetStream not
available"): waited out and tried again, never the end of a service."""

_ELECTING = (*JETSTREAM_UNAVAILABLE, StreamLeaderless, PeersMissing)


async def ensure_stream(
    js: JetStreamContext, *, limits: StreamLimits | None = None, max_msg_size: int | None = None
) -> None:
    """`ensure_streams_now`, tried again while the cluster elects a leader (within ELECTION_WAIT_S)."""
    deadline = asyncio.get_running_loop().time() + ELECTION_WAIT_S
    while True:
        try:
            return await ensure_streams_now(js, limits=limits, max_msg_size=max_msg_size)
        except _ELECTING as error:
            if asyncio.get_running_loop().time() > deadline:
                if isinstance(error, StreamLeaderless):
                    raise StreamSetupError({"leader": ("one", None)}, hint=(
                        f"; no leader was elected within {ELECTION_WAIT_S:.0f}s: are most of the "
                        "cluster's JetStream servers up?")) from error
                if isinstance(error, PeersMissing):
                    raise StreamSetupError({"placement": ("every copy placed", str(error))}, hint=(
                        f"; within {ELECTION_WAIT_S:.0f}s: are all of the cluster's JetStream servers "
                        "up?")) from error
                raise
            log.warning("the stream does not answer (%r): a leader election? trying again", error)
            await asyncio.sleep(0.5)


async def ensure_streams_now(
    js: JetStreamContext, *, limits: StreamLimits | None = None, max_msg_size: int | None = None
) -> None:
    """Create or update both streams idempotently, then verify what the server really kept.

    `limits` None keeps the stream's limits as they are (a process without the settings, e.g.
    a test, never undoes them); `max_msg_size` (the bus's max payload) overrides theirs. A
    stream already as wanted is left untouched. The dead-letter stream has as many copies as
    the event stream (on a cluster, a node down never stops a service from starting)."""
    replicas = await _ensure_event_stream(js, limits, max_msg_size)
    wanted = replace(dead_letter_stream_config(), num_replicas=replicas)
    try:
        current = (await js.stream_info(DEAD_LETTER_STREAM)).config
    except NotFoundError:
        current = None
    if current is None or (current.num_replicas or 1, current.subjects, current.max_msgs) != (
            replicas, wanted.subjects, wanted.max_msgs):
        await _create_or_update(js, wanted)


async def _ensure_event_stream(js: JetStreamContext, limits: StreamLimits | None, max_msg_size: int | None) -> int:
    """The event stream as wanted (see `ensure_stream`); its number of copies."""
    current = await _stream_config(js)
    limits = limits or (StreamLimits.of(current) if current else StreamLimits())
    if max_msg_size is not None:
        limits = replace(limits, max_msg_size=max_msg_size)
    if limits.replicas == 0 and current is not None:
        limits = replace(limits, replicas=current.num_replicas or 1)  # Auto: as it was created.
    wanted = stream_config(limits)
    if current is not None and not _mismatches(wanted, current):
        return current.num_replicas or 1
    try:
        try:
            got = await _create_or_update(js, wanted)
        except nats.js.errors.APIError as error:
            if error.err_code != _NOT_CLUSTERED or limits.replicas:
                raise
            wanted = stream_config(replace(limits, replicas=1))  # A single server: one copy.
            got = await _create_or_update(js, wanted)
    except nats.js.errors.APIError as error:
        raise StreamSetupError({"setup": (limits, error.description)}, hint=(
            "; lower BATON_STREAM_MAX_BYTES or give NATS more JetStream storage"
            if error.err_code == 10047 else "")) from error
    if mismatches := _mismatches(wanted, got):
        raise StreamSetupError(mismatches, hint=(
            "; Baton needs nats-server 2.11 or newer" if "subject_transform" in mismatches else ""))
    if wanted.num_replicas and wanted.num_replicas > 1:
        await _verify_peers(js, wanted.num_replicas)
    return got.num_replicas or 1


async def _verify_peers(js: JetStreamContext, replicas: int) -> None:
    """The cluster really placed `replicas` copies (a leader and replicas - 1 peers)."""
    try:
        cluster = (await js.stream_info(STREAM)).cluster
    except NotFoundError:  # Just created: its group is still forming.
        raise StreamLeaderless(STREAM) from None
    peers = len(cluster.replicas or []) if cluster is not None else 0
    if cluster is not None and cluster.leader is None:
        raise StreamLeaderless(STREAM)
    if cluster is None or peers != replicas - 1:
        raise StreamSetupError({"replicas": (replicas, 1 + peers if cluster and cluster.leader else 0)},
                               hint="; the cluster has too few JetStream servers up")


def _mismatches(wanted: StreamConfig, got: StreamConfig) -> dict[str, tuple[object, object]]:
    """What the server kept that differs from what Baton needs (by setting: wanted, got)."""
    want, have = StreamLimits.of(wanted), StreamLimits.of(got)
    return {
        name: (w, h)
        for name, w, h in (
            ("subjects", sorted(wanted.subjects or []), sorted(got.subjects or [])),
            ("storage", wanted.storage, got.storage),
            ("retention", wanted.retention, got.retention),
            ("duplicate_window", float(DUPLICATE_WINDOW_S), float(got.duplicate_window or 0)),
            ("max_bytes", want.max_bytes, have.max_bytes),
            ("max_age_s", want.max_age_s, have.max_age_s),
            ("max_msg_size", want.max_msg_size, have.max_msg_size),
            ("replicas", wanted.num_replicas or 1, got.num_replicas or 1),
            ("subject_transform", _transform(wanted), _transform(got)),
        )
        if w != h
    }


def _transform(config: StreamConfig) -> tuple[str, str] | None:
    transform = config.subject_transform
    return (transform.src, transform.dest) if transform is not None else None


async def _stream_config(js: JetStreamContext) -> StreamConfig | None:
    try:
        return (await js.stream_info(STREAM)).config
    except NotFoundError:
        return None


async def _create_or_update(js: JetStreamContext, wanted: StreamConfig) -> StreamConfig:
    """The stream as the server kept it, from its answer to the create or update (on a cluster,
    asking again at once may meet a stream whose group is still forming: "not found"). Too few
    servers to place its copies is PeersMissing, waited out by `ensure_stream`."""
    try:
        try:
            await js.stream_info(wanted.name)
            return (await js.update_stream(wanted)).config
        except NotFoundError:
            return (await js.add_stream(wanted)).config
    except nats.js.errors.APIError as error:
        if error.err_code == _NO_PEERS:  # Not an error in the config: the cluster is not all there.
            raise PeersMissing(error.description) from error
        raise


async def dead_letter_count(js: JetStreamContext) -> int:
    return (await js.stream_info(DEAD_LETTER_STREAM)).state.messages


async def connect_nats(url: str, *, name: str, credentials: Credentials | None = None,
                       inbox_prefix: str | None = None, timeout_s: float = 30.0,
                       error_cb: Callable[[Exception], Awaitable[None]] | None = None) -> Client:
    """Connect within `timeout_s` (NATS may still be starting); reconnect forever after.

    Raises ConnectionRefusedError at once if NATS refuses the credentials (that will not change
    on retry) and ConnectionError when NATS cannot be reached in time. `credentials`: a `.creds`
    path or text (nats_auth) for a NATS that requires them."""
    refused = asyncio.Event()
    last_error: list[Exception] = []

    async def on_error(error: Exception) -> None:
        last_error[:] = [error]
        if "authorization violation" in str(error).lower():
            refused.set()
        if error_cb is not None:
            await error_cb(error)
        else:
            log.warning("NATS (%s): %s", name, error)

    options: dict[str, Any] = {"error_cb": on_error}
    if credentials is not None:
        options["user_credentials"] = credentials
    if inbox_prefix is not None:
        options["inbox_prefix"] = inbox_prefix
    # nats-py retries a first connection forever when reconnects are unlimited: bounded here.
    connecting = asyncio.ensure_future(nats.connect(
        servers=nats_server_urls(url), name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=2, **options))
    waiting_refusal = asyncio.ensure_future(refused.wait())
    try:
        await asyncio.wait({connecting, waiting_refusal}, timeout=timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting_refusal.cancel()
    if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
        return connecting.result()
    connecting.cancel()
    await asyncio.gather(connecting, return_exceptions=True)
    if refused.is_set():
        raise ConnectionRefusedError(
            f"NATS at {url} refused {name}'s credentials ({last_error[0]}); see the README's "
            "Security model (BATON_NATS_CREDS, `baton nats-config`)")
    detail = last_error[0] if last_error else (connecting.exception() if not connecting.cancelled() else None)
    raise ConnectionError(f"cannot reach NATS at {url} within {timeout_s:.0f}s: {detail or 'no answer'}")


@asynccontextmanager
async def open_bus(url: str, *, name: str, credentials: Credentials | None = None,
                   stream_limits: StreamLimits | None = None) -> AsyncIterator[Bus]:
    """Connected, stream checked (with `stream_limits`; None keeps the stream's); closed on exit.

    Closed, not drained: nothing in flight needs finishing, because every effect is
    committed with its position and an unacknowledged message is simply redelivered.
    """
    denials = PublishDenials()
    nc = await connect_nats(url, name=name, credentials=credentials, error_cb=denials.on_error)
    try:
        js = nc.jetstream()
        await ensure_stream(js, limits=stream_limits, max_msg_size=nc.max_payload)
        yield Bus(nc=nc, js=js, _denials=denials)
    finally:
        await nc.close()
