"""What must hold for a task's history after any crash: nothing lost, nothing twice."""

from __future__ import annotations

from collections import Counter


def counting_prompt(nonce: str, lines: int, *, pause_s: float = 0.05) -> str:
    """A shell script printing `line <i> <nonce>` for i = 1..lines, slowly, then writing a file."""
    return (f'for i in $(seq 1 {lines}); do echo "line $i {nonce}"; sleep {pause_s}; done\n'
            f'echo "{nonce}" > done.txt\n')


def assert_nothing_lost_nothing_twice(events: list[dict], *, nonce: str, lines: int) -> None:
    ids = Counter(e["event_id"] for e in events)
    assert not [i for i, n in ids.items() if n > 1], "an event_id is on the stream twice"
    types = Counter(e["type"] for e in events)
    assert types["PromptDelivered"] == 1, f"PromptDelivered {types['PromptDelivered']} times"
    assert types["AgentSessionStarted"] == 1
    assert types["TaskCompleted"] == 1 and types["TaskFailed"] == 0
    outputs = [e["data"] for e in events if e["type"] == "AgentOutput"]
    assert [o["seq"] for o in outputs] == list(range(1, len(outputs) + 1)), "AgentOutput seq not contiguous"
    printed = Counter(o["text"].strip() for o in outputs if nonce in o["text"])
    assert printed == Counter(f"line {i} {nonce}" for i in range(1, lines + 1)), "an output line lost or doubled"
