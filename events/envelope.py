"""The wire format: one JSON envelope per event, one JetStream subject per task and type."""

from __future__ import annotations

import re
import secrets
import uuid
from datetime import UTC, datetime
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

STREAM = "BATON_EVENTS"
"""The JetStream stream that holds every domain event."""

SUBJECT_PREFIX = "baton.task"
STREAM_SUBJECTS = (f"{SUBJECT_PREFIX}.>",)

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

TASK_ID_PATTERN = r"^[0-9a-f]{16}$"
"""What every task id the gateway hands out looks like (`new_task_id`); routes, WebSockets and the
CLI take nothing else, so a task id can never be a subject wildcard (`*`, `>`) or span tokens."""
TASK_ID_FORM = "16 lowercase hex digits, as POST /api/tasks returns (e.g. 3f9a0c2b7d41e865)"
_TASK_ID = re.compile(TASK_ID_PATTERN)


def new_task_id() -> str:
    return secrets.token_hex(8)


def is_task_id(value: str) -> bool:
    return _TASK_ID.fullmatch(value) is not None


def task_id_problem(value: str) -> str | None:
    """None for a well-formed task id, else a message saying what a task id looks like."""
    if is_task_id(value):
        return None
    return f"{value[:80]!r} is not a task id: a task id is {TASK_ID_FORM}"


PARTITIONS = 8
"""Each task's events are stored in one of this many partitions (see `partition_of`): a service
consumes each partition through its own durable consumer, so a task's events reach it in order,
one replica at a time, while tasks spread over replicas. Fixed for a stream's lifetime."""

SUBJECT_TRANSFORM = (
    f"{SUBJECT_PREFIX}.*.*",
    f"{SUBJECT_PREFIX}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.{{{{partition({PARTITIONS},1)}}}}",
)
"""(source, destination) of the stream's subject transform: an event published on
`baton.task.<task>.<type>` is stored on `baton.task.<task>.<type>.<partition>`, the partition
computed by the server from the task id (nats-server's `partition()`, FNV-1a; `partition_of`)."""


def subject_for(task_id: str, event_type: str) -> str:
    """`baton.task.<task_id>.<type>`: where an event is published (and what a credential may publish)."""
    return f"{SUBJECT_PREFIX}.{task_id}.{event_type}"


def partition_of(task_id: str) -> int:
    """The partition the stream stores a task's events in: FNV-1a (32 bit) of the task id modulo
    PARTITIONS, as nats-server's `{{partition(n,1)}}` computes it (a contract test holds the two equal)."""
    digest = 0x811C9DC5
    for byte in task_id.encode():
        digest = ((digest ^ byte) * 0x01000193) & 0xFFFFFFFF
    return digest % PARTITIONS


def stored_subject(task_id: str, event_type: str) -> str:
    """`baton.task.<task_id>.<type>.<partition>`: the subject the stream keeps the event under."""
    return f"{subject_for(task_id, event_type)}.{partition_of(task_id)}"


def task_subjects(task_id: str) -> str:
    """Every event of one task."""
    return f"{SUBJECT_PREFIX}.{task_id}.>"


def type_subjects(event_type: str) -> str:
    """One event type, across all tasks (as stored)."""
    return f"{SUBJECT_PREFIX}.*.{event_type}.*"


def partition_subjects(partition: int, event_types: Iterable[str]) -> list[str]:
    """The stored subjects of `event_types` in one partition: one consumer's filter."""
    return [f"{SUBJECT_PREFIX}.*.{event_type}.{partition}" for event_type in event_types]


def type_of_subject(subject: str) -> str:
    """The event type a stored (or published) subject names."""
    return subject.split(".", 4)[3]


def new_event_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Envelope(BaseModel):
    """One event on the bus: who, what, when and why, with the event's own fields in `data`.

    `event_id` is also the `Nats-Msg-Id` header, so publishing the same envelope twice
    stores it once. `causation_id` is the event_id of the event that caused this one
    (None for a user's own action).
    """

    model_config = ConfigDict(frozen=True)

    event_id: str = Field(default_factory=new_event_id)
    type: str
    task_id: str
    occurred_at: datetime = Field(default_factory=utcnow)
    actor: str
    causation_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("task_id")
    @classmethod
    def _task_id_is_a_subject_token(cls, value: str) -> str:
        # The task id becomes a subject token: no dots, no wildcards, no spaces.
        if not _TOKEN.match(value):
            raise ValueError("task_id must be 1-64 of [A-Za-z0-9_-]")
        return value

    @property
    def subject(self) -> str:
        return subject_for(self.task_id, self.type)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Envelope:
        return cls.model_validate_json(raw)
