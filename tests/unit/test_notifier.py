"""The notifier's outbox: queued once per event and endpoint, retried with backoff, signed, resumed
after a restart, given up with a reason; an in-memory store and a clock the test controls."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta

import pytest
from eventsourcing.persistence import Tracking

from events import Envelope
from services.notifier.domain import backoff_s
from services.notifier.endpoints import NotifyConfigError, parse_endpoints
from services.notifier.handlers import Notifier
from services.notifier.messages import DELIVERY_HEADER, SIGNATURE_HEADER, is_signed_by
from tests.unit.fakes import envelopes_in, popo_store

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
TASK = "0123456789abcdef"
HOOK_URL = "https://hooks.example.com/services/T000/B000/s3cr3t-path?token=q"
_seq = itertools.count(1)


class FakeReceiver:
    """Answers each POST with the next status (then 200), recording what it got."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.posts: list[tuple[str, bytes, dict[str, str]]] = []

    async def post(self, url: str, payload: bytes, headers: dict[str, str]) -> int:
        self.posts.append((url, payload, headers))
        return self.statuses.pop(0) if self.statuses else 200


class KnownTask:
    def __init__(self, policy: str = "auto") -> None:
        self.policy = policy

    async def submitted(self, task_id: str) -> dict | None:
        return {"repo": "https://example.com/acme/widgets.git", "permission_policy": self.policy}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def endpoints(form: str = "json", events: tuple[str, ...] = ("TaskCompleted", "TaskFailed", "PermissionRequested")):
    return parse_endpoints(json.dumps([{"name": "team", "url": HOOK_URL, "events": list(events),
                                        "format": form, "secret": "shh-signing-key"}]), source="test")


def notifier(receiver: FakeReceiver, *, store=None, clock=None, form="json", max_attempts=5, policy="auto") -> Notifier:
    return Notifier(store or popo_store(), endpoints(form), receiver, KnownTask(policy), public_url="https://baton.example.com",
                    max_attempts=max_attempts, backoff_first_s=2.0, clock=clock or Clock())


async def record(n: Notifier, event_type: str, **data) -> Envelope:
    envelope = Envelope(type=event_type, task_id=TASK, actor="test", data=data)
    await n.on_event(envelope, Tracking(f"notifier-{event_type}", next(_seq)))
    return envelope


async def work(n: Notifier) -> None:
    """Start what is due and let those attempts finish."""
    n.start_due_attempts()
    for attempt in list(n.in_flight.values()):
        await attempt


def outcomes(n: Notifier) -> list[tuple[str, dict]]:
    return [(e.type, e.data) for e in envelopes_in(n.store)]


async def test_a_wanted_event_is_posted_once_signed_with_its_delivery_id_and_recorded_delivered():
    receiver = FakeReceiver()
    n = notifier(receiver)
    completed = await record(n, "TaskCompleted", branch=f"baton/{TASK}", commit="abc")
    await record(n, "TaskCancelled", by="user")  # Not wanted.

    await work(n)
    await work(n)  # Nothing is due any more.

    assert len(receiver.posts) == 1
    url, payload, headers = receiver.posts[0]
    assert url == HOOK_URL and is_signed_by("shh-signing-key", payload, headers[SIGNATURE_HEADER])
    body = json.loads(payload)
    assert body | {"occurred_at": None} == {
        "event_type": "TaskCompleted", "event_id": completed.event_id, "task_id": TASK, "state": "completed",
        "occurred_at": None, "repo": "https://example.com/acme/widgets.git", "branch": f"baton/{TASK}",
        "commit": "abc", "pull_request_url": None, "reason": None,
        "link": f"https://baton.example.com/tasks/{TASK}"}
    assert outcomes(n) == [("NotificationDelivered", {
        "endpoint": "team", "event_id": completed.event_id, "event_type": "TaskCompleted",
        "delivery_id": headers[DELIVERY_HEADER], "attempts": 1})]


async def test_a_failing_endpoint_is_retried_with_doubling_waits_under_the_same_delivery_id():
    receiver, clock = FakeReceiver(500, 500), Clock()
    n = notifier(receiver, clock=clock)
    await record(n, "TaskFailed", reason="the agent could not run")

    await work(n)
    await work(n)  # Not due yet: the first retry waits 2 s.
    assert len(receiver.posts) == 1
    clock.now += timedelta(seconds=2)
    await work(n)
    clock.now += timedelta(seconds=3.9)
    await work(n)  # The second retry waits 4 s.
    assert len(receiver.posts) == 2
    clock.now += timedelta(seconds=0.1)
    await work(n)

    assert len(receiver.posts) == 3
    assert len({headers[DELIVERY_HEADER] for _, _, headers in receiver.posts}) == 1
    assert [(t, d["attempts"]) for t, d in outcomes(n)] == [("NotificationDelivered", 3)]
    assert backoff_s(2.0, 1) == 2.0 and backoff_s(2.0, 3) == 8.0 and backoff_s(2.0, 30) == 600.0


async def test_an_endpoint_that_keeps_failing_is_given_up_naming_the_status_never_its_url():
    receiver, clock = FakeReceiver(*[503] * 10), Clock()
    n = notifier(receiver, clock=clock, max_attempts=3)
    await record(n, "TaskFailed", reason="boom")
    for _ in range(3):
        await work(n)
        clock.now += timedelta(minutes=10)
    await work(n)

    assert len(receiver.posts) == 3
    [(kind, data)] = outcomes(n)
    assert kind == "NotificationFailed" and data["attempts"] == 3 and data["reason"] == "HTTP 503"
    assert "hooks.example.com" not in json.dumps(data) and "shh" not in json.dumps(data)


async def test_a_restarted_notifier_delivers_what_was_queued_before_it_stopped():
    store = popo_store()
    first = notifier(FakeReceiver(), store=store)
    await record(first, "TaskCompleted", branch="b", commit="c")  # Queued with its position, not yet posted.

    receiver = FakeReceiver()
    again = notifier(receiver, store=store)
    again.resume()
    await work(again)

    assert len(receiver.posts) == 1
    assert [t for t, _ in outcomes(again)] == ["NotificationDelivered"]


async def test_the_slack_form_is_one_text_line_with_the_task_link():
    receiver = FakeReceiver()
    n = notifier(receiver, form="slack")
    await record(n, "TaskFailed", reason="the agent could not run")
    await work(n)

    body = json.loads(receiver.posts[0][1])
    assert list(body) == ["text"]
    assert f"<https://baton.example.com/tasks/{TASK}|{TASK}>" in body["text"]
    assert "failed" in body["text"] and "the agent could not run" in body["text"]


def test_a_bad_configuration_is_named_without_its_secrets():
    with pytest.raises(NotifyConfigError) as refused:
        parse_endpoints(json.dumps([{"name": "x", "url": "ftp://user:pw@host/secret-path", "secret": "k",
                                     "events": ["TaskExploded"]}]), source="BATON_NOTIFY_WEBHOOKS")
    message = str(refused.value)
    assert "TaskExploded" in message and "url must start with https://" in message
    assert "secret-path" not in message and "pw" not in message
    with pytest.raises(NotifyConfigError, match="unique"):
        parse_endpoints(json.dumps([{"name": "a", "url": "https://h/"}, {"name": "a", "url": "https://h/"}]),
                        source="test")
    assert "s3cr3t" not in repr(endpoints())


async def test_a_permission_request_is_news_only_when_a_person_answers_it():
    asked = FakeReceiver()
    n = notifier(asked, policy="ask")
    await record(n, "PermissionRequested", request_id="r1", tool_call_id="c", title="Run rm -rf build?", options=[])
    await work(n)
    body = json.loads(asked.posts[0][1])
    assert body["state"] == "waiting_for_permission" and body["reason"] == "Run rm -rf build?"

    # Under the `auto` policy it was answered at once: nobody is told, and nothing is left to do.
    answered = FakeReceiver()
    n = notifier(answered, policy="auto")
    await record(n, "PermissionRequested", request_id="r2", tool_call_id="c", title="t", options=[])
    await work(n)
    await work(n)
    assert answered.posts == [] and outcomes(n) == [] and n.pending_count() == 0


async def test_an_opened_pull_request_is_told_with_its_url():
    receiver = FakeReceiver()
    n = Notifier(popo_store(), endpoints(events=("PullRequestOpened",)), receiver, KnownTask(),
                 public_url=None, max_attempts=3, backoff_first_s=1.0, clock=Clock())
    await record(n, "PullRequestOpened", url="https://github.com/acme/widgets/pull/7", number=7,
                 head=f"baton/{TASK}", base="main")
    await work(n)

    body = json.loads(receiver.posts[0][1])
    assert body["state"] == "pull_request_opened" and body["link"] is None
    assert body["pull_request_url"] == "https://github.com/acme/widgets/pull/7"


async def test_two_replicas_sharing_a_store_each_post_the_notifications_of_their_own_partitions_once():
    from events import partition_of
    from services.runtime.partitions import HeldPartitions

    def preferring(replica: tuple[int, int]) -> HeldPartitions:  # Nobody pinned: each holds what it prefers.
        held = HeldPartitions(replica)
        for partition in range(8):
            held.observe(partition, None)
        return held

    store, receivers = popo_store(), (FakeReceiver(), FakeReceiver())
    replicas = [Notifier(store, endpoints(), receivers[i], KnownTask(), public_url="https://baton.example.com",
                         max_attempts=5, backoff_first_s=2.0, clock=Clock(), held=preferring((i, 2)))
                for i in (0, 1)]
    tasks = [next(f"{n:016x}" for n in itertools.count(7) if partition_of(f"{n:016x}") == k) for k in (0, 1)]
    for replica, task_id in zip(replicas, tasks):  # Each handles its partition's event.
        await replica.on_event(Envelope(type="TaskFailed", task_id=task_id, actor="test", data={"reason": "r"}),
                               Tracking(f"notifier-p{partition_of(task_id)}", next(_seq)))
    for replica in replicas:  # Both restart: each resumes its own partitions' outboxes only.
        replica.outboxes.clear()
        replica.resume()
        await work(replica)
    assert [json.loads(r.posts[0][1])["task_id"] for r in receivers] == tasks
    assert [len(r.posts) for r in receivers] == [1, 1]
