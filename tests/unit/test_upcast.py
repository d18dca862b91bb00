"""Upcasting: an event written in an older version of its schema reads as the current shape."""

from __future__ import annotations

import json

import jsonschema
import pytest

from events import Envelope, TaskCompleted, envelope_for, parse_event
from events import versions
from events.asyncapi import asyncapi_document, envelope_schema
from events.versions import MissingUpcaster, Upcasters


def test_a_version_1_event_is_written_as_before_without_a_schema_version():
    envelope = envelope_for(TaskCompleted(branch="b", commit="c"), task_id="t1", actor="service:task-runner")
    assert envelope.data == {"branch": "b", "commit": "c"}
    assert b"schema_version" not in envelope.to_json()


def test_upcasters_chain_from_the_written_version_to_the_current_one():
    upcasters = Upcasters()
    upcasters.register("Thing", from_version=1)(lambda data: {**data, "b": data["a"] * 2})
    upcasters.register("Thing", from_version=2)(lambda data: {"c": data["b"] + 1})

    assert upcasters.upcast("Thing", {"a": 1}, version=1, current=3) == {"c": 3}
    assert upcasters.upcast("Thing", {"b": 5}, version=2, current=3) == {"c": 6}
    assert upcasters.upcast("Thing", {"c": 9}, version=3, current=3) == {"c": 9}
    assert upcasters.missing({"Thing": 4}) == ["Thing v3"]


def test_a_version_without_an_upcaster_is_refused_by_name():
    with pytest.raises(MissingUpcaster, match="Thing v1 cannot be read as v2"):
        Upcasters().upcast("Thing", {}, version=1, current=2)


def test_one_upcaster_per_version():
    upcasters = Upcasters()
    upcasters.register("Thing", from_version=1)(lambda data: data)
    with pytest.raises(ValueError, match="already has an upcaster"):
        upcasters.register("Thing", from_version=1)(lambda data: data)


def test_parse_event_reads_an_old_envelope_as_the_current_shape(monkeypatch: pytest.MonkeyPatch):
    # Suppose TaskCompleted v2 had renamed v1's `sha` to `commit`: a v1 envelope still parses.
    upcasters = Upcasters()
    upcasters.register("TaskCompleted", from_version=1)(
        lambda data: {"branch": data["branch"], "commit": data["sha"]})
    monkeypatch.setattr(versions, "UPCASTERS", upcasters)
    monkeypatch.setattr(TaskCompleted, "schema_version", 2)
    old = Envelope(type="TaskCompleted", task_id="t1", actor="service:task-runner",
                   data={"branch": "baton/t1", "sha": "abc"})

    assert parse_event(old) == TaskCompleted(branch="baton/t1", commit="abc")
    # And one written today says it is a v2, and is read as it is.
    new = envelope_for(TaskCompleted(branch="baton/t1", commit="abc"), task_id="t1", actor="x")
    assert new.data["schema_version"] == 2
    assert parse_event(new) == TaskCompleted(branch="baton/t1", commit="abc")


def test_the_contract_shows_a_later_version_in_its_data_schema(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(TaskCompleted, "schema_version", 2)
    document = asyncapi_document()
    new = envelope_for(TaskCompleted(branch="baton/t1", commit="abc"), task_id="3f9a0c2b7d41e865", actor="x")

    assert document["components"]["messages"]["TaskCompleted"]["x-schema-version"] == 2
    assert jsonschema.Draft202012Validator(envelope_schema(document, "TaskCompleted")).is_valid(
        json.loads(new.to_json()))
