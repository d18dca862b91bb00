"""Each service's own event store: `eventsourcing` aggregates whose events are bus envelopes.

A service records an event by calling `emit` on one of its aggregates and saving it; the
relay later reads the store's notification log and publishes each envelope unchanged.
Storage is chosen by configuration (`store_env`), never by code.
"""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from eventsourcing.application import (
    AggregateNotFoundError,
    Application,
    ProcessingEvent,
)
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError, ProcessRecorder, Recording, Tracking

from events import BaseEvent, Envelope, envelope_for
from events.versions import current_shape
from services.runtime.settings import Settings

_ID_NAMESPACE = uuid.UUID("6f1c1d1e-8a56-4a59-9a8e-6b0a7f3b9a10")


class SpoiledAggregate(RuntimeError):
    """An aggregate object whose save failed was given to a save again (ServiceStore)."""


def aggregate_id(kind: str, task_id: str) -> uuid.UUID:
    """A stable id per (aggregate kind, task), so a service finds a task's aggregate by task id."""
    return uuid.uuid5(_ID_NAMESPACE, f"{kind}/{task_id}")


class TaskAggregate(Aggregate):
    """An aggregate about one task whose recorded events are the envelopes it emits.

    Subclasses keep their state current in `apply`, which runs when an envelope is
    emitted and again when the aggregate is rebuilt from its store.
    """

    INITIAL_VERSION = 1

    @staticmethod
    def create_id(task_id: str) -> uuid.UUID:  # overridden per kind by __init_subclass__
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__qualname__
        cls.create_id = staticmethod(lambda task_id, **_: aggregate_id(kind, task_id))

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.seen_types: list[str] = []

    @classmethod
    def id_for(cls, task_id: str) -> uuid.UUID:
        return cls.create_id(task_id)

    class Recorded(Aggregate.Event):
        """One envelope this aggregate emitted; stored as the envelope's JSON dict (`envelope`).

        (Topic `services.runtime.store:TaskAggregate.Recorded` for every kind of aggregate, as
        when it was an `@event("Recorded")` method: stored data stays readable.)
        """

        envelope: dict[str, Any]

        def apply(self, aggregate: Any) -> None:
            aggregate._take_recorded(self.envelope)

    def emit(self, event: BaseEvent, *, actor: str, causation_id: str | None = None) -> Envelope:
        envelope, payload = _envelope_and_payload(event, self.task_id, actor, causation_id)
        # The envelope is stored as its JSON dict. `apply` gets the envelope itself (no
        # dump -> validate round trip per event); a rebuild validates the stored dict.
        self._emitting = envelope
        try:
            self.trigger_event(TaskAggregate.Recorded, envelope=payload, timestamp=envelope.occurred_at)
        finally:
            self.__dict__.pop("_emitting", None)
        return envelope

    def _take_recorded(self, payload: dict[str, Any]) -> None:
        parsed = self.__dict__.pop("_emitting", None)
        if parsed is None:  # Rebuilt from the store: an event of an older version in the current shape.
            parsed = current_shape(Envelope.model_validate(payload))
        self.seen_types.append(parsed.type)
        self.apply(parsed)

    def apply(self, envelope: Envelope) -> None:
        """Update state from one of this aggregate's envelopes."""


_checked_task_ids: set[str] = set()
"""Task ids an envelope was validated with in this process (the only field that needs it)."""


def _envelope_and_payload(
    event: BaseEvent, task_id: str, actor: str, causation_id: str | None
) -> tuple[Envelope, dict[str, Any]]:
    """`envelope_for(...)` and its `model_dump(mode="json")`, the same values either way.

    The first envelope of a task is built and validated by `envelope_for`. After that, every
    field is known valid (the event is a validated model, the task id was checked, the id and
    the time are made here), so the envelope is assembled without validating it again and its
    JSON dict is written directly (pydantic's form: a UTC time ends in "Z"). A chatty agent's
    output pays this per line.
    """
    if (task_id not in _checked_task_ids or type(actor) is not str
            or not (causation_id is None or type(causation_id) is str)):
        envelope = envelope_for(event, task_id=task_id, actor=actor, causation_id=causation_id)
        if len(_checked_task_ids) > 10_000:
            _checked_task_ids.clear()
        _checked_task_ids.add(task_id)
        return envelope, envelope.model_dump(mode="json")
    data = event.model_dump(mode="json")
    event_id = _new_event_id()
    occurred_at = datetime.now(UTC)
    envelope = _construct({"event_id": event_id, "type": event.type, "task_id": task_id,
                           "occurred_at": occurred_at, "actor": actor, "causation_id": causation_id,
                           "data": data})
    payload = {"event_id": event_id, "type": event.type, "task_id": task_id,
               "occurred_at": _json_time(occurred_at), "actor": actor, "causation_id": causation_id,
               "data": dict(data)}
    return envelope, payload


_ENVELOPE_FIELDS = frozenset(Envelope.model_fields)


def _construct_directly(values: dict[str, Any]) -> Envelope:
    """`Envelope.model_construct(**values)` for a complete set of fields, without its per-field
    loop (what it sets: the fields, which were set, no extra, no private)."""
    envelope = Envelope.__new__(Envelope)
    object.__setattr__(envelope, "__dict__", values)
    object.__setattr__(envelope, "__pydantic_fields_set__", set(_ENVELOPE_FIELDS))
    object.__setattr__(envelope, "__pydantic_extra__", None)
    object.__setattr__(envelope, "__pydantic_private__", None)
    return envelope


def _pick_construct() -> Callable[[dict[str, Any]], Envelope]:
    """The direct construction if it builds what pydantic builds (checked once), else pydantic's."""
    sample = Envelope(type="X", task_id="t", actor="a", data={"k": [1]})
    try:
        direct = _construct_directly(dict(sample.__dict__))
        if direct == sample and direct.model_dump() == sample.model_dump() and direct.to_json() == sample.to_json():
            return _construct_directly
    except Exception:
        pass
    return lambda values: Envelope.model_construct(**values)


_construct = _pick_construct()


def _json_time(moment: datetime) -> str:
    """A UTC time as pydantic writes it in JSON: ISO-8601, "Z", microseconds only when not 0."""
    text = moment.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _new_event_id() -> str:
    """As `uuid.uuid4().hex` (random, version 4, RFC 4122 variant), without building a UUID."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    return raw.hex()


def envelope_of(domain_event: object) -> Envelope | None:
    """The bus envelope a stored domain event carries, or None for internal events."""
    payload = getattr(domain_event, "envelope", None)
    return Envelope.model_validate(payload) if payload is not None else None


def store_env(settings: Settings, store_name: str) -> dict[str, str]:
    """The `eventsourcing` environment for one service's store.

    PostgreSQL when `database_url` is set (tables named after the store), else a SQLite file
    under the data dir.
    """
    if settings.database_url:
        return postgres_env(settings.database_url, schema=f"baton_{store_name.replace('-', '_')}")
    return sqlite_env(settings.path("stores", f"{store_name}.sqlite"))


def sqlite_env(path: Path) -> dict[str, str]:
    return {"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path),
            "SQLITE_LOCK_TIMEOUT": "30"}


def postgres_env(database_url: str, *, schema: str) -> dict[str, str]:
    url = urlsplit(database_url)
    if url.scheme not in ("postgresql", "postgres") or not url.path.strip("/"):
        raise ValueError("BATON_DATABASE_URL must look like postgresql://user:password@host:5432/dbname")
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": unquote(url.path.strip("/")),
        "POSTGRES_HOST": url.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": unquote(url.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(url.password or ""),
        "POSTGRES_LOCK_TIMEOUT": "10",
        # Connections kept open at rest (more, up to 10 besides, open under load): each replica
        # of each service has its own pool, and PostgreSQL allows 100 clients by default.
        "POSTGRES_POOL_SIZE": "2",
        # One schema per store: services starting together never race on shared types.
        "POSTGRES_SCHEMA": schema,
    }


@contextmanager
def _postgres_schema_made_alone(env: dict[str, str]) -> Iterator[None]:
    """The store's schema exists; inside, no other process is making its tables: replicas
    starting together on a new store take turns (concurrent DDL collides in PostgreSQL)."""
    import psycopg

    with psycopg.connect(
        dbname=env["POSTGRES_DBNAME"], host=env["POSTGRES_HOST"], port=env["POSTGRES_PORT"],
        user=env["POSTGRES_USER"], password=env["POSTGRES_PASSWORD"] or None, autocommit=True,
    ) as connection:
        # Held by this session until it closes (whatever happens inside).
        connection.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"baton store setup {env['POSTGRES_SCHEMA']}",))
        connection.execute(f'CREATE SCHEMA IF NOT EXISTS "{env["POSTGRES_SCHEMA"]}"')
        yield


class ServiceStore(Application):
    """A service's application: its aggregates, its notification log, its consumer positions."""

    def __init__(self, name: str, env: dict[str, str] | None = None) -> None:
        # The name keeps each service's tables apart when they share one PostgreSQL database.
        self.name = name.replace("-", "_")
        if env and env.get("PERSISTENCE_MODULE") == "eventsourcing.postgres":
            with _postgres_schema_made_alone(env):
                super().__init__(env)
        else:
            try:
                super().__init__(env)
            except IntegrityError:
                # SQLite replicas starting together on a new store race to create its tables: the
                # loser's first tracking record collides with the winner's. The tables exist now.
                super().__init__(env)
        self._listeners: list[Callable[[list[Recording]], None]] = []
        self._spoiled: weakref.WeakValueDictionary[int, Aggregate] = weakref.WeakValueDictionary()

    @property
    def process_recorder(self) -> ProcessRecorder:
        assert isinstance(self.recorder, ProcessRecorder)
        return self.recorder

    def construct_recorder(self) -> ProcessRecorder:
        # A process recorder also keeps tracking positions, in the same database.
        return self.factory.process_recorder()

    def on_recorded(self, listener: Callable[[list[Recording]], None]) -> None:
        """Call `listener` with what was recorded (events and their notification ids) after
        every commit: the relay publishes it from memory."""
        self._listeners.append(listener)

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        with self._spoiling_if_unsaved(objs):
            recordings = super().save(*objs, **kwargs)
        self._fire(recordings)
        return recordings

    def save_processed(self, tracking: Tracking, *aggregates: Aggregate | None) -> None:
        """Save the aggregates' new events and the consumer position in one transaction."""
        with self._spoiling_if_unsaved(aggregates):
            processing = ProcessingEvent(tracking)
            processing.collect_events(*aggregates)
            recordings = self._record(processing)
        self._fire(recordings)

    @contextmanager
    def _spoiling_if_unsaved(self, objs: tuple[Any, ...]) -> Iterator[None]:
        """A save takes the aggregates' pending events before writing them: if it fails, they are
        lost and each aggregate object is ahead of the store. Such an object is never saved again
        (it would record a version after one never stored); read the aggregate again instead."""
        if spoiled := [obj for obj in objs if self._spoiled.get(id(obj)) is obj]:
            raise SpoiledAggregate(f"{type(spoiled[0]).__name__} {spoiled[0].id} failed to save before; "
                                   "read it again from the store")
        try:
            yield
        except BaseException:
            for obj in objs:
                if isinstance(obj, Aggregate):
                    self._spoiled[id(obj)] = obj
            raise

    def is_processed(self, tracking: Tracking) -> bool:
        return self.process_recorder.has_tracking_id(
            tracking.application_name, tracking.notification_id
        )

    def get_task_aggregate(self, cls: type[TaskAggregate], task_id: str) -> Any | None:
        """The task's aggregate rebuilt from the store (one replay), or None."""
        try:
            return self.repository.get(cls.id_for(task_id))
        except AggregateNotFoundError:
            return None

    def last_envelope(self, cls: type[TaskAggregate], task_id: str) -> Envelope | None:
        """The last envelope the task's aggregate recorded, read alone (no replay), or None."""
        stored = self.recorder.select_events(cls.id_for(task_id), desc=True, limit=1)
        return envelope_of(self.mapper.to_domain_event(stored[0])) if stored else None

    def _fire(self, recordings: list[Recording]) -> None:
        for listener in self._listeners:
            listener(recordings)


@contextmanager
def forgotten_if_unsaved(cache: MutableMapping[str, Any], *task_ids: str) -> Iterator[None]:
    """Around a save of aggregates a handler keeps in `cache` between events (by task id): if the
    save fails, they are forgotten, and the next event reads them from the store again.
    eventsourcing takes an aggregate's pending events from it before writing them, so an aggregate
    whose save failed (a replica that saved first, a lost connection) is ahead of its store in
    memory; saved on top of, it would record a version after one never stored, and no replica
    could read it back."""
    try:
        yield
    except BaseException:
        for task_id in task_ids:
            cache.pop(task_id, None)
        raise
