"""The published event contract (AsyncAPI 3) says what `events/` says, and an envelope is held to it."""

from __future__ import annotations

import json
import re

import jsonschema
from typer.testing import CliRunner

from events import EVENT_TYPES, FLOW_CONTRACT, TaskCompleted, envelope_for
from events.asyncapi import asyncapi_document, envelope_schema
from services.cli.main import app

DOCUMENT = asyncapi_document()


def is_valid(envelope: dict, event_type: str) -> bool:
    return jsonschema.Draft202012Validator(envelope_schema(DOCUMENT, event_type)).is_valid(envelope)


def test_the_document_names_every_event_with_its_subject_emitter_and_promise():
    assert DOCUMENT["asyncapi"] == "3.0.0"
    assert set(DOCUMENT["channels"]) == set(EVENT_TYPES)
    for name, cls in EVENT_TYPES.items():
        assert DOCUMENT["channels"][name]["address"] == f"baton.task.{{task_id}}.{name}"
        message = DOCUMENT["components"]["messages"][name]
        assert message["x-emitter"] == cls.emitter
        assert message["x-schema-version"] == cls.schema_version
        assert message["description"].split("\n", 1)[0] == cls.__doc__.strip().split("\n", 1)[0]
        assert DOCUMENT["operations"][f"receive{name}"]["action"] == "receive"
    assert DOCUMENT["x-flow-contract"]["handoffs"] == list(FLOW_CONTRACT)


def test_every_reference_in_the_document_resolves():
    text = json.dumps(DOCUMENT)
    for ref in set(re.findall(r'"\$ref": "#/([^"]+)"', text)):
        node = DOCUMENT
        for part in ref.split("/"):
            node = node[part]  # A KeyError names the dangling reference.
        assert isinstance(node, dict), ref


def test_every_event_s_schema_is_a_valid_json_schema():
    for name in EVENT_TYPES:
        jsonschema.Draft202012Validator.check_schema(envelope_schema(DOCUMENT, name))


def test_an_envelope_as_the_services_write_it_validates_and_a_wrong_one_does_not():
    envelope = json.loads(envelope_for(TaskCompleted(branch="baton/x", commit="0" * 40),
                                       task_id="3f9a0c2b7d41e865", actor="service:task-runner").to_json())
    assert is_valid(envelope, "TaskCompleted")
    # A field the event does not have, a missing one, or another type's name: each refused.
    assert not is_valid({**envelope, "data": {**envelope["data"], "surprise": 1}}, "TaskCompleted")
    assert not is_valid({**envelope, "data": {"commit": "0" * 40}}, "TaskCompleted")
    assert not is_valid({**envelope, "type": "TaskFailed"}, "TaskCompleted")


def test_baton_events_schema_prints_the_same_document():
    result = CliRunner().invoke(app, ["events", "schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json.loads(json.dumps(DOCUMENT))
