"""The gateway's intake limits and its one task-id pattern, without a stack."""

from __future__ import annotations

import pytest

from events.envelope import is_task_id, new_task_id, task_id_problem
from services.gateway.limits import SubmitRateLimit, ViewerSlots


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_client_gets_its_burst_then_waits_for_the_rate():
    clock = Clock()
    limit = SubmitRateLimit(rate_per_s=2.0, burst=3, clock=clock)

    assert [limit.take("10.0.0.1") for _ in range(3)] == [0.0, 0.0, 0.0]
    # The bucket is empty: the fourth waits half a second (2 per second), and spends nothing.
    assert limit.take("10.0.0.1") == pytest.approx(0.5)
    assert limit.take("10.0.0.1") == pytest.approx(0.5)
    clock.now += 0.5
    assert limit.take("10.0.0.1") == 0.0


def test_each_client_has_its_own_bucket():
    limit = SubmitRateLimit(rate_per_s=1.0, burst=1, clock=Clock())

    assert limit.take("10.0.0.1") == 0.0
    assert limit.take("10.0.0.1") > 0
    assert limit.take("10.0.0.2") == 0.0


def test_the_refusal_names_the_limits_and_says_when_to_retry():
    limit = SubmitRateLimit(rate_per_s=0.25, burst=2)

    message, headers = limit.refusal(3.2)

    assert headers == {"Retry-After": "4"}
    assert "at most 2 at once" in message and "0.25 per second" in message
    assert "BATON_SUBMIT_BURST" in message and "submit again in 4 s" in message


def test_full_buckets_are_forgotten_once_many_clients_were_seen():
    clock = Clock()
    limit = SubmitRateLimit(rate_per_s=1.0, burst=1, clock=clock, max_clients=3)
    for n in range(3):
        limit.take(f"10.0.0.{n}")
    clock.now += 5  # Every bucket is full again.

    limit.take("10.0.0.9")

    assert set(limit._buckets) == {"10.0.0.9"}


def test_viewer_slots_refuse_one_past_the_cap_and_free_on_give_back():
    slots = ViewerSlots(cap=2)

    assert slots.take() and slots.take()
    assert not slots.take()
    slots.give_back()
    assert slots.take()
    assert "at most 2 live viewers" in slots.refusal
    assert len(slots.refusal.encode()) <= 123  # It must fit a WebSocket close frame.


@pytest.mark.parametrize("value", ["*", ">", "a.b", "", "0123456789ABCDEF", "0123456789abcde",
                                   "0123456789abcdef0", "0123456789abcdef\n", "baton.task.>"])
def test_anything_but_16_lowercase_hex_digits_is_not_a_task_id(value: str):
    assert not is_task_id(value)
    assert "16 lowercase hex digits" in task_id_problem(value)


def test_new_task_ids_match_the_pattern():
    assert all(is_task_id(new_task_id()) for _ in range(100))
    assert task_id_problem(new_task_id()) is None
