"""The flow contract: the handoffs every successful task shows on the stream, in this order."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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


DEADLINES: tuple[Deadline, ...] = (
    Deadline("WorkspaceRequested", "TaskSubmitted", 30),
    Deadline("WorkspaceReady", "WorkspaceRequested", 120),
    Deadline("AgentSessionStarted", "WorkspaceReady", 60),
    Deadline("PromptDelivered", "WorkspaceReady", 30),
    Deadline("AgentOutput", "PromptDelivered", 120),
    Deadline("BranchPushed", "AgentFinished", 60),
    Deadline("TaskCompleted", "BranchPushed", 30),
)
"""The flow contract's deadlines, by awaited handoff. AgentFinished has none: agents may work
long; a silent agent is caught as AgentStalled instead."""

WAITING_FOR: dict[str, str] = {"TaskQueued": "WorkspaceRequested"}
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


def last_attempt(event_types: list[str]) -> list[str]:
    """The types of a task's events (stream order) that its last attempt's flow is judged by:
    all of them when it ran once, else TaskSubmitted and what follows the last AttemptStarted."""
    if NEW_ATTEMPT not in event_types:
        return event_types
    start = len(event_types) - event_types[::-1].index(NEW_ATTEMPT)
    return [t for t in event_types[:start] if t == FLOW_CONTRACT[0]][:1] + event_types[start:]


@dataclass(frozen=True)
class FlowReport:
    """How far a task's events follow the contract."""

    reached: tuple[str, ...]
    missing: tuple[str, ...]
    out_of_order: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.out_of_order

    @property
    def first_gap(self) -> str | None:
        """The first handoff that never happened, e.g. 'PromptDelivered'."""
        return self.missing[0] if self.missing else None

    def describe(self) -> str:
        if self.ok:
            return "flow complete: " + " → ".join(self.reached)
        parts = []
        if self.missing:
            index = FLOW_CONTRACT.index(self.missing[0])
            after = FLOW_CONTRACT[index - 1] if index else "nothing"
            parts.append(f"missing handoff {self.missing[0]} (after {after})")
        if self.out_of_order:
            parts.append("out of order: " + ", ".join(self.out_of_order))
        return "; ".join(parts)


def check_flow(event_types: Iterable[str]) -> FlowReport:
    """Compare the types of a task's events, in stream order, with FLOW_CONTRACT.

    A handoff is out of order when its first occurrence precedes the first occurrence
    of the handoff before it in the contract. A task whose workspace was lost is judged by its
    last attempt: the submission, then what follows its last AttemptStarted.
    """
    first_index: dict[str, int] = {}
    for index, event_type in enumerate(last_attempt(list(event_types))):
        first_index.setdefault(event_type, index)
    reached = tuple(step for step in FLOW_CONTRACT if step in first_index)
    missing = tuple(step for step in FLOW_CONTRACT if step not in first_index)
    positions = [first_index[step] for step in reached]
    out_of_order = tuple(
        step for i, step in enumerate(reached) if i and positions[i] < positions[i - 1]
    )
    return FlowReport(reached=reached, missing=missing, out_of_order=out_of_order)
