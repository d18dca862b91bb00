"""The Watch aggregate: what the monitor has seen of one task's current turn, and the gaps it named.

Only first occurrences are recorded (not every AgentOutput), with their times, so the
timers are rebuilt from the store after a restart and fire on time. Each follow-up's turn
(TurnRequested) is watched like the first, from its own handoffs.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from eventsourcing.domain import event

from events import (
    DEADLINES,
    FLOW_CONTRACT,
    TERMINAL_TYPES,
    AgentStalled,
    Deadline,
    Envelope,
    StepOverdue,
    StepRecovered,
)
from events.flow import NEW_TURN, contract_for_turn, deadlines_for_turn
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
        self.counted_seq = 0  # last_seq as recorded when the task last ended
        self.asked: dict[str, str] = {}  # open permission request → when it was asked
        self.answered: set[str] = set()
        self.person_waits: list[tuple[str, float]] = []  # (asked at, seconds) of each answered request
        self.attempt = 1
        self.attempt_began_at: str | None = None  # when the current attempt's workspace was requested
        self.turn = 1
        self.turn_began_at: str | None = None  # when the current turn (2, 3, …) was requested
        self.turn_requested = False  # its TurnRequested was folded (not only its PromptDelivered)
        self.turn_reprovisioned = False  # the turn makes a workspace again (released, or lost during it)
        self.latest: dict[str, tuple[str, str]] = {}  # handoff → (at, event id) of its latest occurrence

    @event("AttemptBegan")
    def attempt_began(self, attempt: int, at: str) -> None:
        """A new attempt (the last one's workspace was lost) follows the flow from WorkspaceRequested
        again: what earlier attempts reached, or missed, is theirs."""
        self.attempt, self.attempt_began_at = attempt, at
        self.turn_reprovisioned = self.turn > 1
        self._forget_from("WorkspaceRequested")
        self.last_seq = 0

    @event("TurnBegan")
    def turn_began(self, turn: int, reprovision: bool, at: str, event_id: str, requested: bool) -> None:
        """Turn `turn` began (its TurnRequested, or its PromptDelivered folded first): its handoffs
        are watched from `at`, those already folded that happened since counting as its own."""
        if turn > self.turn:
            self.turn, self.turn_began_at, self.turn_requested, self.turn_reprovisioned = turn, at, False, False
            self._forget_from("WorkspaceRequested")
        if requested:
            self.turn_requested, self.turn_reprovisioned = True, reprovision
            self.seen[NEW_TURN], self.seen_ids[NEW_TURN] = at, event_id
        began = min(datetime.fromisoformat(at), datetime.fromisoformat(self.turn_began_at or at))
        self.turn_began_at = began.isoformat()
        for step, (seen_at, seen_id) in self.latest.items():
            if step != NEW_TURN and datetime.fromisoformat(seen_at) >= began:
                self.seen.setdefault(step, seen_at)
                self.seen_ids.setdefault(step, seen_id)

    @event("OutputCounted")
    def output_counted(self, last_seq: int) -> None:
        """The task ended (a turn completed) after output `last_seq`: a later turn's stall, watched
        by a monitor that let the ended task go, names the output that came before it."""
        self.last_seq = self.counted_seq = last_seq

    def _forget_from(self, step: str) -> None:
        """What the flow reached from `step` on is an earlier attempt's or turn's."""
        for later in FLOW_CONTRACT[FLOW_CONTRACT.index(step):]:
            self.seen.pop(later, None)
            self.seen_ids.pop(later, None)
            self.overdue.pop(later, None)
        self.overdue.pop("AgentOutput", None)
        self.stalled_at_seq = None
        self.asked.clear()

    @property
    def contract(self) -> tuple[str, ...]:
        """The handoffs the current turn must show, in order."""
        return contract_for_turn(self.turn, reprovisioned=self.turn_reprovisioned)

    def deadlines(self, deadlines: tuple[Deadline, ...] = DEADLINES) -> tuple[Deadline, ...]:
        """The current turn's deadlines (the first turn's, as the turn's own handoffs)."""
        return deadlines_for_turn(deadlines, self.turn, reprovisioned=self.turn_reprovisioned)

    def before_turn(self, at: datetime) -> bool:
        """`at` is before the current turn (2, 3, …) began."""
        return self.turn_began_at is not None and at < datetime.fromisoformat(self.turn_began_at)

    def of_earlier_turn(self, envelope: Envelope) -> bool:
        """An event that happened before the current turn began (relayed late) is not its."""
        return self.before_turn(envelope.occurred_at)

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
        """An occurrence of a handoff (or the task's end): the current turn's first is `seen`; the
        latest is remembered, for a turn found to have begun before it."""
        when = datetime.fromisoformat(at)
        if event_type not in self.latest or when > datetime.fromisoformat(self.latest[event_type][0]):
            self.latest[event_type] = (at, event_id)
        if not self.before_turn(when):
            self.seen.setdefault(event_type, at)
            self.seen_ids.setdefault(event_type, event_id)

    def remember(self, event_type: str, at: datetime, event_id: str) -> None:
        """Another occurrence of a handoff, recorded if it is the latest (a later turn may own it)."""
        latest = self.latest.get(event_type)
        if latest is None or at > datetime.fromisoformat(latest[0]):
            self.observe(event_type, at.isoformat(), event_id)

    def overdue_step(self, deadline: Deadline, now: datetime) -> None:
        started = self.seen_at(deadline.after)
        assert started is not None
        waited = round((now - started).total_seconds(), 1)
        event_ = StepOverdue(expected=deadline.expected, after=deadline.after, waited_s=waited, turn=self.turn)
        self.emit(event_, actor=ACTOR, causation_id=self.seen_ids.get(deadline.after))

    def recovered_step(self, expected: str, at: datetime, *, cause: str) -> None:
        after = self.overdue[expected]
        waited = round((at - self.seen_at(after)).total_seconds(), 1) if self.seen_at(after) else 0.0
        event_ = StepRecovered(expected=expected, after=after, waited_s=waited, turn=self.turn)
        self.emit(event_, actor=ACTOR, causation_id=cause)

    def stalled(self, silent_s: float) -> None:
        event_ = AgentStalled(silent_s=round(silent_s, 1), last_seq=self.last_seq, turn=self.turn)
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
    """The turn's flow moved past `deadline.expected` without it (a later handoff already happened)."""
    if deadline.expected not in watch.contract:  # A provider's own handoff (a server's): timed only.
        return False
    later = watch.contract[watch.contract.index(deadline.expected) + 1:]
    return any(step in watch.seen for step in later)
