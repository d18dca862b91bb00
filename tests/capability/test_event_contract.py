"""The published event contract is what a real task run puts on the bus, envelope by envelope."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import jsonschema
import nats
import pytest

from events import STREAM, task_subjects
from events.asyncapi import asyncapi_document, envelope_schema
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.processes import BatonStack

pytestmark = pytest.mark.capability


async def stream_envelopes(stack: BatonStack, task_id: str) -> list[dict]:
    """Every envelope of the task exactly as the stream stores it (read with an auditor's credential)."""
    nc = await nats.connect(stack.nats_url, user_credentials=stack.nats_credentials(), allow_reconnect=False)
    try:
        reader = await nc.jetstream().pull_subscribe(task_subjects(task_id), stream=STREAM)
        envelopes: list[dict] = []
        # As many as the consumer says the stream holds for the task: no timeout stands for "the end".
        pending = (await reader.consumer_info()).num_pending
        while len(envelopes) < pending:
            for message in await reader.fetch(min(pending - len(envelopes), 100), timeout=30):
                envelopes.append(json.loads(message.data))
                await message.ack()
        return envelopes
    finally:
        await nc.close()


def test_the_contract_is_served_to_an_authenticated_client_only(stack: BatonStack, api: Api):
    assert httpx.get(f"{stack.api}/api/events/asyncapi.json", timeout=10).status_code == 401
    served = api.http.get("/api/events/asyncapi.json")
    assert served.status_code == 200
    # In step with events/: the running gateway serves what the code generates.
    assert served.json() == json.loads(json.dumps(asyncapi_document()))


def test_every_envelope_of_a_real_task_validates_against_the_served_contract(api: Api, origin: Path,
                                                                             stack: BatonStack):
    document = api.http.get("/api/events/asyncapi.json").json()
    task_id = api.submit(repo=origin.as_uri(), prompt="echo contract > contract.txt", agent="shell")["task_id"]
    assert_flow_completes(api, task_id, timeout_s=120)

    envelopes = asyncio.run(stream_envelopes(stack, task_id))

    assert "TaskCompleted" in {e["type"] for e in envelopes}
    for envelope in envelopes:
        errors = list(jsonschema.Draft202012Validator(envelope_schema(document, envelope["type"]))
                      .iter_errors(envelope))
        assert not errors, f"{envelope['type']}: {[e.message for e in errors]}"
