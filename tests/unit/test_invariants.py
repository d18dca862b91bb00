"""The crash tests' invariant check itself fails on a lost or doubled event."""

from __future__ import annotations

import pytest

from tests.support.invariants import assert_nothing_lost_nothing_twice


def history(lines: int, nonce: str = "n") -> list[dict]:
    events = [{"event_id": t, "type": t, "data": {}} for t in
              ("TaskSubmitted", "AgentSessionStarted", "PromptDelivered")]
    events += [{"event_id": f"o{i}", "type": "AgentOutput",
                "data": {"seq": i, "text": f"line {i} {nonce}\n"}} for i in range(1, lines + 1)]
    return events + [{"event_id": "done", "type": "TaskCompleted", "data": {}}]


def test_a_clean_history_passes():
    assert_nothing_lost_nothing_twice(history(3), nonce="n", lines=3)


def test_an_event_id_twice_fails():
    events = history(3)
    with pytest.raises(AssertionError, match="twice"):
        assert_nothing_lost_nothing_twice([*events, events[1]], nonce="n", lines=3)


def test_a_second_prompt_delivery_fails():
    events = history(3)
    extra = {"event_id": "again", "type": "PromptDelivered", "data": {}}
    with pytest.raises(AssertionError, match="PromptDelivered 2 times"):
        assert_nothing_lost_nothing_twice([*events, extra], nonce="n", lines=3)


def test_a_lost_output_line_fails():
    events = [e for e in history(3) if e["event_id"] != "o2"]
    with pytest.raises(AssertionError, match="seq not contiguous"):
        assert_nothing_lost_nothing_twice(events, nonce="n", lines=3)


def attempt_started(attempt: int) -> dict:
    return {"event_id": f"attempt{attempt}", "type": "AttemptStarted",
            "data": {"attempt": attempt, "reason": "the workspace's vm_agent exited"}}


def test_a_lost_attempt_then_a_complete_one_passes_each_counting_its_output_from_1():
    lost = [e for e in history(2) if e["type"] != "TaskCompleted"]
    retried = [{**e, "event_id": f"{e['event_id']}-a2"} for e in history(3) if e["type"] != "TaskSubmitted"]
    assert_nothing_lost_nothing_twice([*lost, attempt_started(2), *retried], nonce="n", lines=3)


def test_a_second_prompt_delivery_within_one_attempt_fails():
    lost = [e for e in history(2) if e["type"] != "TaskCompleted"]
    lost.append({"event_id": "again", "type": "PromptDelivered", "data": {}})
    retried = [{**e, "event_id": f"{e['event_id']}-a2"} for e in history(3) if e["type"] != "TaskSubmitted"]
    with pytest.raises(AssertionError, match="PromptDelivered 2 times in attempt 1"):
        assert_nothing_lost_nothing_twice([*lost, attempt_started(2), *retried], nonce="n", lines=3)
