"""What must hold for a task's history after any crash: nothing lost, nothing twice."""

from __future__ import annotations

from collections import Counter


def counting_prompt(nonce: str, lines: int, *, pause_s: float = 0.05) -> str:
    """A shell script printing `line <i> <nonce>` for i = 1..lines, slowly, then writing a file."""
    return (f'for i in $(seq 1 {lines}); do echo "line $i {nonce}"; sleep {pause_s}; done\n'
            f'echo "{nonce}" > done.txt\n')


def attempts_of(events: list[dict]) -> list[list[dict]]:
    """A task's events (stream order) cut into its attempts: a new one at each AttemptStarted."""
    attempts: list[list[dict]] = [[]]
    for event in events:
        if event["type"] == "AttemptStarted":
            attempts.append([])
        attempts[-1].append(event)
    return attempts


def assert_nothing_lost_nothing_twice(events: list[dict], *, nonce: str, lines: int) -> None:
    """Each event once; the task completed; its last attempt started once, got its prompt once
    and printed every line once; an earlier (lost) attempt did each at most once. `AgentOutput.seq`
    is contiguous from 1 within each attempt."""
    ids = Counter(e["event_id"] for e in events)
    assert not [i for i, n in ids.items() if n > 1], "an event_id is on the stream twice"
    types = Counter(e["type"] for e in events)
    assert types["TaskCompleted"] == 1 and types["TaskFailed"] == 0
    *earlier, last = attempts_of(events)
    for number, attempt in enumerate([*earlier, last], start=1):
        types = Counter(e["type"] for e in attempt)
        allowed = {1} if attempt is last else {0, 1}  # A lost attempt may have died before either.
        assert types["PromptDelivered"] in allowed, f"PromptDelivered {types['PromptDelivered']} times in attempt {number}"
        assert types["AgentSessionStarted"] in allowed, f"AgentSessionStarted {types['AgentSessionStarted']} times"
        outputs = [e["data"] for e in attempt if e["type"] == "AgentOutput"]
        assert [o["seq"] for o in outputs] == list(range(1, len(outputs) + 1)), (
            f"AgentOutput seq not contiguous in attempt {number}")
        printed = Counter(o["text"].strip() for o in outputs if nonce in o["text"])
        assert all(n == 1 for n in printed.values()), f"an output line doubled in attempt {number}"
    assert printed == Counter(f"line {i} {nonce}" for i in range(1, lines + 1)), "an output line lost or doubled"
