"""A message no consumer can handle is dead-lettered with its error, counted, and blocks nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest

from events import STREAM, Envelope, partition_of
from services.runtime.bus import DEAD_LETTER_STREAM
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.processes import BatonStack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability


async def publish_raw(url: str, subject: str, payload: bytes, *, credentials: str) -> None:
    nc = await nats.connect(url, user_credentials=credentials)
    try:
        await nc.jetstream().publish(subject, payload, stream=STREAM)
    finally:
        await nc.close()


async def dead_letters(url: str, *, credentials: str) -> list[dict]:
    nc = await nats.connect(url, user_credentials=credentials)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe("baton.deadletter.>", stream=DEAD_LETTER_STREAM)
        try:
            messages = await sub.fetch(100, timeout=2)
        except (nats.errors.TimeoutError, TimeoutError):
            messages = []
        return [json.loads(m.data) for m in messages]
    finally:
        await nc.close()


def test_undecodable_and_unhandleable_events_are_dead_lettered_and_the_flow_goes_on(
    stack: BatonStack, api: Api, origin: Path
):
    before = api.http.get("/api/health").json()["dead_letters"]

    # Garbage where the task runner expects a TaskSubmitted…
    # (Published with the gateway's credential: the only one that may publish a TaskSubmitted.)
    gateway = stack.nats_credentials("gateway")
    asyncio.run(publish_raw(stack.nats.url, "baton.task.poison1.TaskSubmitted", b"{not an envelope",
                            credentials=gateway))
    # …and a well-formed envelope whose data breaks the contract (the handler cannot parse it).
    bad = Envelope(type="TaskSubmitted", task_id="poison2", actor="test", data={"repo": 1})
    asyncio.run(publish_raw(stack.nats.url, bad.subject, bad.to_json(), credentials=gateway))

    # Both are dead-lettered by the task runner (the garbage by every consumer of it)…
    def parked_by_the_task_runner() -> list[dict] | None:
        parked = [d for d in asyncio.run(dead_letters(stack.nats.url, credentials=stack.nats_credentials()))
                  if d["consumer"] in {f"task-runner-p{partition_of(t)}" for t in ("poison1", "poison2")}]
        return parked if {"poison1", "poison2"} <= {p for d in parked for p in ("poison1", "poison2")
                                                      if p in d["subject"]} else None

    parked = wait_for(parked_by_the_task_runner, timeout_s=60, what="both poison messages dead-lettered")
    assert any(d["error"].startswith("undecodable envelope") for d in parked)
    assert any("poison2" in d["data"] and "validation error" in d["error"] for d in parked)
    # …and counted.
    assert api.http.get("/api/health").json()["dead_letters"] >= before + 2

    # …and a real task behind them still travels the whole path; health stays 200.
    task = api.submit(repo=origin.as_uri(), prompt="echo after the poison", agent="shell")
    assert_flow_completes(api, task["task_id"], timeout_s=90)
    assert api.http.get("/api/health").status_code == 200
