"""Every handler and read model sees `envelope.data` in its type's current shape: an envelope
written in an older version is upcast where it is decoded off the bus (the consumer, Bus.last_event,
events.client), not by each reader.

The version bump is synthetic: suppose TaskCompleted v1 called the commit `sha` and v2 (today's
class) calls it `commit`, with a test-only upcaster between them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from eventsourcing.persistence import Tracking

from events import Envelope, TaskCompleted, TaskSubmitted, envelope_for
from events import client, versions
from events.versions import Upcasters, current_shape
from projections.sql import SQLiteDatabase
from projections.task_board import TaskBoard
from services.runtime.bus import Bus
from services.runtime.consumer import _process, _process_batch
from tests.unit.fakes import FakeBus, FakeMsg, popo_store

TASK = "a0a0a0a0a0a0a0a0"
SHA = "1" * 40


@pytest.fixture
def task_completed_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    upcasters = Upcasters()
    upcasters.register("TaskCompleted", from_version=1)(
        lambda data: {"branch": data["branch"], "commit": data["sha"]})
    monkeypatch.setattr(versions, "UPCASTERS", upcasters)
    monkeypatch.setattr(TaskCompleted, "schema_version", 2)


def completed_as_v1_wrote_it() -> Envelope:
    return Envelope(type="TaskCompleted", task_id=TASK, actor="service:task-runner",
                    data={"branch": f"baton/{TASK}", "sha": SHA})


def on_the_bus(envelope: Envelope, seq: int) -> FakeMsg:
    return FakeMsg(data=envelope.to_json(), stream_seq=seq)


async def test_a_handler_is_handed_an_old_envelope_in_the_current_shape(task_completed_v2: None):
    seen: list[dict[str, Any]] = []

    async def handle(envelope: Envelope, tracking: Tracking) -> None:
        seen.append(envelope.data)

    await _process(FakeBus(), "svc-TaskCompleted", on_the_bus(completed_as_v1_wrote_it(), 3), handle, popo_store())

    assert seen == [{"branch": f"baton/{TASK}", "commit": SHA, "schema_version": 2}]


async def test_the_board_folds_old_envelopes_through_the_consumer_as_the_current_shape(
        task_completed_v2: None, tmp_path: Path):
    board = TaskBoard(SQLiteDatabase(tmp_path / "board.sqlite"))
    submitted = envelope_for(TaskSubmitted(repo="file:///r", prompt="p", agent="shell"), task_id=TASK, actor="user")

    async def project(envelope: Envelope, tracking: Tracking) -> None:
        board.apply(envelope, tracking)

    async def project_batch(items: list[tuple[Envelope, Tracking]]) -> None:
        board.apply_batch(items)

    try:
        messages = [on_the_bus(submitted, 1), on_the_bus(completed_as_v1_wrote_it(), 2)]
        await _process_batch(FakeBus(), "projector-board", messages,
                             project, project_batch, board)
        row = board.get(TASK)
    finally:
        board.close()

    assert (row["state"], row["commit"]) == ("completed", SHA)


async def test_an_old_version_without_an_upcaster_is_dead_lettered_naming_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(TaskCompleted, "schema_version", 2)  # and no upcaster from v1
    bus, seen = FakeBus(), []

    async def handle(envelope: Envelope, tracking: Tracking) -> None:
        seen.append(envelope)

    await _process(bus, "svc-TaskCompleted", on_the_bus(completed_as_v1_wrote_it(), 4), handle, popo_store())

    assert seen == []
    [(_, payload)] = bus.js.published
    assert json.loads(payload)["error"] == "TaskCompleted v1 cannot be read as v2: no upcaster from v1 (events/versions.py)"


async def test_the_last_event_of_a_task_comes_in_the_current_shape(task_completed_v2: None):
    class Stream:
        async def get_last_msg(self, stream: str, subject: str) -> SimpleNamespace:
            return SimpleNamespace(data=completed_as_v1_wrote_it().to_json())

    last = await Bus(nc=None, js=Stream()).last_event(TASK, "TaskCompleted")  # type: ignore[arg-type]

    assert last is not None and last.data["commit"] == SHA


def test_another_services_client_gets_the_envelope_and_the_event_in_the_current_shape(task_completed_v2: None):
    received = client._received(completed_as_v1_wrote_it().to_json(), 7)

    assert received is not None
    assert received.envelope.data["commit"] == SHA
    assert received.event == TaskCompleted(branch=f"baton/{TASK}", commit=SHA)


def test_a_current_envelope_is_handed_on_as_it_is():
    envelope = envelope_for(TaskCompleted(branch="b", commit=SHA), task_id=TASK, actor="service:task-runner")
    assert current_shape(envelope) is envelope


def test_an_envelope_upcast_once_is_not_upcast_again(task_completed_v2: None):
    once = current_shape(completed_as_v1_wrote_it())
    assert current_shape(once) is once
