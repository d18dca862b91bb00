"""The flow contract: the handoffs every successful task shows on the stream, in this order."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

FLOW_CONTRACT: tuple[str, ...] = (
    "TaskSubmitted",
    "WorkspaceRequested",
    "WorkspaceReady",
    "AgentSessionStarted",
    "PromptDelivered",
    "AgentOutput",
    "AgentFinished",
    "BranchPushed",
    "TaskCompleted",
)


@dataclass(frozen=True)
class Deadline:
    """`expected` must follow `after` within `seconds`."""

    expected: str
    after: str
    seconds: float


PROVIDER_DEADLINES: tuple[Deadline, ...] = (
    Deadline("ServerCreated", "ServerRequested", 300),
    Deadline("VmAgentConnected", "ServerCreated", 600),
)
"""A cloud workspace's own handoffs, seen only when its provider requests a server: a server never
created, or whose vm_agent never calls home, is a named gap (WorkspaceReady then waits on them,
not on its own deadline: a VM's boot takes minutes)."""

DEADLINES: tuple[Deadline, ...] = (
    Deadline("WorkspaceRequested", "TaskSubmitted", 30),
    Deadline("WorkspaceReady", "WorkspaceRequested", 120),
    Deadline("AgentSessionStarted", "WorkspaceReady", 60),
    Deadline("PromptDelivered", "WorkspaceReady", 30),
    Deadline("AgentOutput", "PromptDelivered", 120),
    Deadline("BranchPushed", "AgentFinished", 60),
    Deadline("TaskCompleted", "BranchPushed", 30),
    *PROVIDER_DEADLINES,
)
"""The flow contract's deadlines, by awaited handoff. AgentFinished has none: agents may work
long; a silent agent is caught as AgentStalled instead."""

WAITING_FOR: dict[str, str] = {"TaskQueued": "WorkspaceRequested", "ServerRequested": "WorkspaceReady"}
"""Events saying a task legitimately waits for a handoff, and which: a task queued for a place
gets its WorkspaceRequested when it gets the place, however long that takes; so no deadline
runs for that handoff once such an event was seen."""


def parse_deadlines(spec: str, base: tuple[Deadline, ...] = DEADLINES) -> tuple[Deadline, ...]:
    """Override deadlines from `"PromptDelivered=30,AgentOutput=120"` (seconds, by awaited event)."""
    overrides: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, seconds = part.partition("=")
        known = {d.expected for d in base}
        if name.strip() not in known:
            raise ValueError(f"no deadline for {name.strip()!r}; known: {', '.join(sorted(known))}")
        try:
            overrides[name.strip()] = float(seconds)
        except ValueError:
            raise ValueError(f"deadline for {name.strip()} must be seconds, got {seconds!r}") from None
        if overrides[name.strip()] <= 0:
            raise ValueError(f"deadline for {name.strip()} must be positive")
    return tuple(Deadline(d.expected, d.after, overrides.get(d.expected, d.seconds)) for d in base)


NEW_ATTEMPT = "AttemptStarted"
"""A lost workspace's task starts over from WorkspaceRequested: each attempt has its own flow."""

NEW_TURN = "TurnRequested"
"""A follow-up's turn (2, 3, …) starts: each turn has its own flow, judged with the same deadlines."""

TURN_CONTRACT: tuple[str, ...] = (NEW_TURN, "PromptDelivered", "AgentOutput", "AgentFinished",
                                  "BranchPushed", "TaskCompleted")
"""A follow-up's turn handed to the task's lingering agent session: these handoffs, in this order."""

REPROVISIONED_TURN_CONTRACT: tuple[str, ...] = (NEW_TURN, *FLOW_CONTRACT[1:])
"""A follow-up's turn whose workspace was released (or lost during the turn): the whole flow again."""

TURN_NUMBERED = frozenset({NEW_TURN, "PromptDelivered", "TaskCompleted"})
"""The handoffs that say which turn they belong to (`turn`, absent for turn 1)."""


def contract_for_turn(turn: int, *, reprovisioned: bool) -> tuple[str, ...]:
    """The handoffs turn `turn` must show, in order."""
    if turn == 1:
        return FLOW_CONTRACT
    return REPROVISIONED_TURN_CONTRACT if reprovisioned else TURN_CONTRACT


def deadlines_for_turn(deadlines: tuple[Deadline, ...], turn: int, *, reprovisioned: bool) -> tuple[Deadline, ...]:
    """Turn `turn`'s deadlines: turn 1's as given; a later turn's the same seconds for its own
    handoffs, TurnRequested standing for what began the first turn (a lingering turn's
    PromptDelivered follows TurnRequested, a re-provisioned turn's WorkspaceRequested does)."""
    if turn == 1:
        return deadlines
    contract = contract_for_turn(turn, reprovisioned=reprovisioned)
    provider = {d.expected for d in PROVIDER_DEADLINES} if reprovisioned else set()
    return tuple(d if d.expected in provider else Deadline(d.expected, d.after if d.after in contract else NEW_TURN, d.seconds)
                 for d in deadlines if d.expected in contract or d.expected in provider)


def last_attempt(event_types: list[str], head: str = FLOW_CONTRACT[0]) -> list[str]:
    """The types of a task's (or a turn's) events, in stream order, that its last attempt's flow
    is judged by: all of them when it ran once, else its `head` (TaskSubmitted, or a later turn's
    TurnRequested) and what follows the last AttemptStarted."""
    if NEW_ATTEMPT not in event_types:
        return event_types
    start = len(event_types) - event_types[::-1].index(NEW_ATTEMPT)
    return [t for t in event_types[:start] if t == head][:1] + event_types[start:]


def split_turns(events: Iterable[str | Mapping[str, Any]]) -> dict[int, list[str]]:
    """The types of a task's events (stream order) by turn. Events given as envelopes (dicts with
    `type` and `data`) are placed by their `turn` where they carry one (a late TaskCompleted of
    turn 1 stays turn 1's), the others with the latest turn begun; bare types start a turn at each
    TurnRequested. A turn's TurnRequested comes first in its list: the vm_agent may publish the
    turn's PromptDelivered before the task runner's record of the request reaches the bus."""
    turns: dict[int, list[str]] = {1: []}
    current = 1
    for item in events:
        event_type, turn = _type_and_turn(item, current)
        current = max(current, turn)
        if event_type == NEW_TURN:
            turns.setdefault(turn, []).insert(0, event_type)
        else:
            turns.setdefault(turn, []).append(event_type)
    return dict(sorted(turns.items()))


def _type_and_turn(item: str | Mapping[str, Any], current: int) -> tuple[str, int]:
    if isinstance(item, str):
        return item, current + 1 if item == NEW_TURN else current
    if item["type"] in TURN_NUMBERED:
        return item["type"], int((item.get("data") or {}).get("turn", 1))
    return item["type"], current


@dataclass(frozen=True)
class TurnReport:
    """How far one turn's events follow its contract."""

    turn: int
    contract: tuple[str, ...]
    reached: tuple[str, ...]
    missing: tuple[str, ...]
    out_of_order: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.out_of_order

    def named(self, step: str) -> str:
        """`step` as this turn's: 'PromptDelivered', or 'PromptDelivered (turn 2)'."""
        return step if self.turn == 1 else f"{step} (turn {self.turn})"

    def describe(self) -> str:
        where = "" if self.turn == 1 else f" in turn {self.turn}"
        if self.ok:
            return ("flow complete: " if self.turn == 1 else f"turn {self.turn}: ") + " → ".join(self.reached)
        parts = []
        if self.missing:
            index = self.contract.index(self.missing[0])
            after = self.contract[index - 1] if index else "nothing"
            parts.append(f"missing handoff {self.missing[0]} (after {after}){where}")
        if self.out_of_order:
            parts.append("out of order: " + ", ".join(self.out_of_order) + where)
        return "; ".join(parts)


def judge_turn(turn: int, event_types: list[str]) -> TurnReport:
    """Compare one turn's event types (stream order) with its contract, judging its last attempt.

    A handoff is out of order when its first occurrence precedes the first occurrence of the
    handoff before it in the contract."""
    types = last_attempt(event_types, FLOW_CONTRACT[0] if turn == 1 else NEW_TURN)
    contract = contract_for_turn(turn, reprovisioned="WorkspaceRequested" in types)
    first_index: dict[str, int] = {}
    for index, event_type in enumerate(types):
        first_index.setdefault(event_type, index)
    reached = tuple(step for step in contract if step in first_index)
    positions = [first_index[step] for step in reached]
    return TurnReport(
        turn=turn, contract=contract, reached=reached,
        missing=tuple(step for step in contract if step not in first_index),
        out_of_order=tuple(step for i, step in enumerate(reached) if i and positions[i] < positions[i - 1]),
    )


@dataclass(frozen=True)
class FlowReport:
    """How far a task's events follow the contract, turn by turn. `reached`, `missing` and
    `out_of_order` list every turn's handoffs in order, a later turn's named with its turn
    ('BranchPushed (turn 2)'); a task that ran one turn reads exactly as before turns existed."""

    turns: tuple[TurnReport, ...]

    def _steps(self, field: str) -> tuple[str, ...]:
        return tuple(turn.named(step) for turn in self.turns for step in getattr(turn, field))

    @property
    def reached(self) -> tuple[str, ...]:
        return self._steps("reached")

    @property
    def missing(self) -> tuple[str, ...]:
        return self._steps("missing")

    @property
    def out_of_order(self) -> tuple[str, ...]:
        return self._steps("out_of_order")

    @property
    def ok(self) -> bool:
        return all(turn.ok for turn in self.turns)

    @property
    def first_gap(self) -> str | None:
        """The first handoff that never happened, e.g. 'PromptDelivered' or 'BranchPushed (turn 2)'."""
        return self.missing[0] if self.missing else None

    def describe(self) -> str:
        if self.ok:
            return "; ".join(turn.describe() for turn in self.turns)
        return "; ".join(turn.describe() for turn in self.turns if not turn.ok)


def check_flow(events: Iterable[str | Mapping[str, Any]]) -> FlowReport:
    """Compare a task's events, in stream order, with the flow contract, turn by turn: the first
    turn with FLOW_CONTRACT, each follow-up's with its own (TURN_CONTRACT on the lingering
    session, REPROVISIONED_TURN_CONTRACT when its workspace was made again).

    `events` are the events' types, or their envelopes as dicts (then a turn's events are placed
    by the turn they carry: see split_turns). A task or turn whose workspace was lost is judged by
    its last attempt: its first handoff, then what follows its last AttemptStarted.
    """
    return FlowReport(turns=tuple(judge_turn(turn, types) for turn, types in split_turns(events).items()))
