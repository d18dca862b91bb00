"""The Watch aggregate: what the monitor has seen of one task, and the gaps it has named.

Only first occurrences are recorded (not every AgentOutput), with their times, so the
timers are rebuilt from the store after a restart and fire on time.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from eventsourcing.domain import event

from events import (
    FLOW_CONTRACT,
    TERMINAL_TYPES,
    AgentStalled,
    Deadline,
    Envelope,
    StepOverdue,
    StepRecovered,
)
from services.runtime.store import TaskAggregate

ACTOR = "service:monitor"


class Watch(TaskAggregate):
    @event("Opened")
    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.seen: dict[str, str] = {}
        self.seen_ids: dict[str, str] = {}
        self.overdue: dict[str, str] = {}  # expected → after, while not recovered
        self.stalled_at_seq: int | None = None
        self.last_seq = 0
        self.asked: dict[str, str] = {}  # open permission request → when it was asked
        self.answered: set[str] = set()
        self.person_waits: list[tuple[str, float]] = []  # (asked at, seconds) of each answered request
        self.attempt = 1
        self.attempt_began_at: str | None = None  # when the current attempt's workspace was requested

    @event("AttemptBegan")
    def attempt_began(self, attempt: int, at: str) -> None:
        """A new attempt (the last one's workspace was lost) follows the flow from WorkspaceRequested
        again: what earlier attempts reached, or missed, is theirs."""
        self.attempt, self.attempt_began_at = attempt, at
        for step in FLOW_CONTRACT[FLOW_CONTRACT.index("WorkspaceRequested"):]:
            self.seen.pop(step, None)
            self.seen_ids.pop(step, None)
            self.overdue.pop(step, None)
        self.overdue.pop("AgentOutput", None)
        self.stalled_at_seq, self.last_seq = None, 0
        self.asked.clear()

    def of_earlier_attempt(self, envelope: Envelope) -> bool:
        """An event that happened before the current attempt began (relayed late) is not its."""
        return (self.attempt_began_at is not None
                and envelope.occurred_at < datetime.fromisoformat(self.attempt_began_at))

    @property
    def waiting_for_person(self) -> bool:
        """A permission request is open: the agent waits for a person, it is not stalled."""
        return bool(self.asked)

    def deadline_start(self, event_type: str) -> datetime | None:
        """When `event_type` was seen, moved on by the time spent waiting for a person since (None
        while a person is asked): a deadline counts the flow's own time, not the person's."""
        seen = self.seen_at(event_type)
        if seen is None or any(datetime.fromisoformat(at) >= seen for at in self.asked.values()):
            return None  # Waiting for a person now: the deadline's clock is stopped.
        waited = sum(s for at, s in self.person_waits if datetime.fromisoformat(at) >= seen)
        return seen + timedelta(seconds=waited)

    @event("PersonAsked")
    def person_asked(self, request_id: str, at: str) -> None:
        if request_id not in self.answered:  # An answer may be folded before its request.
            self.asked[request_id] = at

    @event("PersonAnswered")
    def person_answered(self, request_id: str, at: str) -> None:
        self.answered.add(request_id)
        asked_at = self.asked.pop(request_id, None)
        if asked_at is not None:
            waited = (datetime.fromisoformat(at) - datetime.fromisoformat(asked_at)).total_seconds()
            self.person_waits.append((asked_at, max(waited, 0.0)))

    @property
    def ended(self) -> bool:
        return any(t in self.seen for t in TERMINAL_TYPES)

    def seen_at(self, event_type: str) -> datetime | None:
        at = self.seen.get(event_type)
        return datetime.fromisoformat(at) if at else None

    @event("Observed")
    def observe(self, event_type: str, at: str, event_id: str) -> None:
        """First occurrence of a handoff (or the task's end)."""
        self.seen.setdefault(event_type, at)
        self.seen_ids.setdefault(event_type, event_id)

    def overdue_step(self, deadline: Deadline, now: datetime) -> None:
        started = self.seen_at(deadline.after)
        assert started is not None
        waited = round((now - started).total_seconds(), 1)
        event_ = StepOverdue(expected=deadline.expected, after=deadline.after, waited_s=waited)
        self.emit(event_, actor=ACTOR, causation_id=self.seen_ids.get(deadline.after))

    def recovered_step(self, expected: str, at: datetime, *, cause: str) -> None:
        after = self.overdue[expected]
        waited = round((at - self.seen_at(after)).total_seconds(), 1) if self.seen_at(after) else 0.0
        event_ = StepRecovered(expected=expected, after=after, waited_s=waited)
        self.emit(event_, actor=ACTOR, causation_id=cause)

    def stalled(self, silent_s: float) -> None:
        event_ = AgentStalled(silent_s=round(silent_s, 1), last_seq=self.last_seq)
        cause = self.seen_ids.get("AgentOutput") or self.seen_ids.get("PromptDelivered")
        self.emit(event_, actor=ACTOR, causation_id=cause)

    def apply(self, envelope: Envelope) -> None:
        data = envelope.data
        if envelope.type == StepOverdue.type:
            self.overdue[data["expected"]] = data["after"]
        elif envelope.type == StepRecovered.type:
            self.overdue.pop(data["expected"], None)
        elif envelope.type == AgentStalled.type:
            self.stalled_at_seq = data["last_seq"]
            self.overdue["AgentOutput"] = "AgentOutput"


def skipped(deadline: Deadline, watch: Watch) -> bool:
    """The flow moved past `deadline.expected` without it (a later handoff already happened)."""
    later = FLOW_CONTRACT[FLOW_CONTRACT.index(deadline.expected) + 1:]
    return any(step in watch.seen for step in later)
