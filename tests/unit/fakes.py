"""In-memory fakes shared by the unit tests: no network, no subprocesses."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

from events import Envelope, stored_subject
from services.runtime.store import ServiceStore
from services.task_runner.vm_agent_client import AgentStartRefused, VmAgentSilent


def popo_store() -> ServiceStore:
    return ServiceStore("test", {"PERSISTENCE_MODULE": "eventsourcing.popo"})


class FakePublisher:
    """Records every batch (as the envelopes the bus would carry) and dead letter; raises
    `fail_with` (once per call) while it is set; like the bus, refuses a batch with Unpublishable
    for its first message over `max_payload` bytes."""

    def __init__(self, *, max_payload: int | None = None) -> None:
        self.batches: list[list[Envelope]] = []
        self.dead_letters: list[tuple[str, dict[str, Any], str]] = []  # (subject, body, msg id)
        self.fail_with: Exception | None = None
        self.max_payload = max_payload
        self.refused = 0

    async def publish_dead_letter(self, subject: str, body: dict[str, Any], *, msg_id: str) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.dead_letters.append((subject, body, msg_id))

    async def publish_batch(self, messages: list[Any]) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        for message in messages:
            if self.max_payload is not None and len(message.to_json()) > self.max_payload:
                from services.runtime.bus import Unpublishable

                self.refused += 1
                raise Unpublishable(message.event_id, f"{len(message.to_json())} bytes, over {self.max_payload}")
        for message in messages:  # What a consumer receives: subject and id match the JSON.
            envelope = Envelope.from_json(message.to_json())
            assert (message.subject, message.event_id) == (envelope.subject, envelope.event_id)
        self.batches.append([Envelope.from_json(m.to_json()) for m in messages])

    @property
    def published(self) -> list[Envelope]:
        return [e for batch in self.batches for e in batch]


class FakeStarter:
    """An AgentStarter that records calls and optionally refuses."""

    def __init__(self, refuse_with: str | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.refuse_with = refuse_with

    silent_on_start = False
    """True: `start_agent_with_prompt` gets no answer in time (VmAgentSilent: it may have started)."""

    async def start_agent_with_prompt(self, vm_agent_url: str, **kwargs: Any) -> None:
        self.calls.append({"vm_agent_url": vm_agent_url, **kwargs})
        if self.silent_on_start:
            raise VmAgentSilent(f"vm_agent of task {kwargs.get('task_id')} did not answer 'sessions' in time")
        if self.refuse_with is not None:
            raise AgentStartRefused(self.refuse_with)

    async def answer_permission(self, vm_agent_url: str, **kwargs: Any) -> None:
        self.calls.append({"answer_to": vm_agent_url, **kwargs})
        if self.refuse_with is not None:
            raise AgentStartRefused(self.refuse_with)

    cancel_answer = True
    """What `cancel_session` says: True (stopping the agent), False (the turn already ended)."""

    async def cancel_session(self, vm_agent_url: str, **kwargs: Any) -> bool:
        self.calls.append({"cancel_at": vm_agent_url, **kwargs})
        if self.refuse_with is not None:
            raise AgentStartRefused(self.refuse_with)
        return self.cancel_answer

    refuse_turns_with: str | None = None
    """Set: `start_turn` refuses with it (the vm_agent is gone)."""
    silent_on_turns = False
    """True: `start_turn` gets no answer in time (VmAgentSilent: the vm_agent may have taken the turn)."""

    async def start_turn(self, vm_agent_url: str, **kwargs: Any) -> None:
        self.calls.append({"turn_at": vm_agent_url, **kwargs})
        if self.silent_on_turns:
            raise VmAgentSilent(f"vm_agent of task {kwargs.get('task_id')} did not answer 'turns' in time")
        if self.refuse_turns_with is not None:
            raise AgentStartRefused(self.refuse_turns_with)


@dataclass
class FakeMsg:
    """The parts of a nats Msg that services.runtime.consumer._process uses."""

    data: bytes
    stream_seq: int
    num_delivered: int = 1
    subject: str | None = None
    """Where the stream stored it; by default the stored subject its envelope names (as the bus routes it)."""
    acks: list[str] = field(default_factory=list)
    nak_delays: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.subject is None:
            try:
                envelope = Envelope.from_json(self.data)
                self.subject = stored_subject(envelope.task_id, envelope.type)
            except ValueError:
                self.subject = "baton.task.t.X"

    @property
    def metadata(self) -> SimpleNamespace:
        return SimpleNamespace(
            sequence=SimpleNamespace(stream=self.stream_seq), num_delivered=self.num_delivered
        )

    async def ack(self) -> None:
        self.acks.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.acks.append("nak")
        self.nak_delays.append(delay)

    async def term(self) -> None:
        self.acks.append("term")

    async def in_progress(self) -> None:
        self.acks.append("in_progress")


class FakeJetStream:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, payload: bytes, **_: Any) -> None:
        self.published.append((subject, payload))


class FakeBus:
    def __init__(self) -> None:
        self.js = FakeJetStream()


def envelopes_in(store: ServiceStore) -> list[Envelope]:
    """Every bus envelope in the store's notification log, in order."""
    from services.runtime.store import envelope_of

    notifications = store.process_recorder.select_notifications(0, 10_000)
    found = (envelope_of(store.mapper.to_domain_event(n)) for n in notifications)
    return [e for e in found if e is not None]


class FakeLookup:
    """The stream as the task runner's EventLookup sees it: the last event per (task, type).

    `record` puts an envelope on it as the bus would: the last of its type, later (occurred_at)
    than everything recorded before it, so "came after" reads as on the stream."""

    def __init__(self) -> None:
        self.last: dict[tuple[str, str], Envelope] = {}
        self._clock = datetime(2026, 1, 1, tzinfo=UTC)
        self._recorded: set[str] = set()

    def record(self, envelope: Envelope) -> Envelope:
        if envelope.event_id in self._recorded:  # A redelivery: the stream holds it once.
            return envelope
        self._recorded.add(envelope.event_id)
        self._clock = max(self._clock + timedelta(milliseconds=1), envelope.occurred_at)
        recorded = envelope.model_copy(update={"occurred_at": self._clock})
        self.last[(envelope.task_id, envelope.type)] = recorded
        return recorded

    def has_whole_flow(self, task_id: str, *, but: tuple[str, ...] = ()) -> None:
        """Every handoff of the first turn's flow contract is on the stream for the task, except `but`."""
        from events import FLOW_CONTRACT

        for step in FLOW_CONTRACT:
            if step not in but:
                self.record(Envelope(type=step, task_id=task_id, actor="test"))

    async def last_event(self, task_id: str, event_type: str):
        return self.last.get((task_id, event_type))
