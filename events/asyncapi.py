"""Baton's event contract as an AsyncAPI 3 document, generated from `events/` (nothing written by hand).

One channel per event type (`baton.task.{task_id}.<Type>`), one message per event: the envelope
whose `data` is the event's JSON Schema (from its pydantic model), who emits it (`x-emitter`), its
schema version (`x-schema-version`; in `data.schema_version` past 1) and what it promises (its
docstring). The flow contract and the stream's name ride along as `x-` fields.
"""

from __future__ import annotations

import inspect
from typing import Any

from events.catalog import EVENT_TYPES, BaseEvent
from events.envelope import STREAM, SUBJECT_PREFIX, Envelope
from events.flow import DEADLINES, FLOW_CONTRACT
from events.versions import SCHEMA_VERSION_KEY

ASYNCAPI_VERSION = "3.0.0"
SCHEMA_REF = "#/components/schemas/{model}"


def asyncapi_document(*, version: str = "0.1.0") -> dict[str, Any]:
    """The whole contract: every type in `EVENT_TYPES` has a channel, a receive operation, a
    message and a schema; `envelope_schema_ref(type)` names the schema an envelope of it validates against."""
    schemas = _schemas()
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Baton events",
            "version": version,
            "description": (f"Every domain event Baton records, as stored in the JetStream stream {STREAM} "
                            f"on subject {SUBJECT_PREFIX}.<task_id>.<type> (one JSON envelope each)."),
        },
        "defaultContentType": "application/json",
        "channels": {name: _channel(name) for name in EVENT_TYPES},
        "operations": {f"receive{name}": _operation(name) for name in EVENT_TYPES},
        "components": {"schemas": schemas, "messages": {name: _message(cls) for name, cls in EVENT_TYPES.items()}},
        "x-stream": STREAM,
        "x-flow-contract": {
            "handoffs": list(FLOW_CONTRACT),
            "deadlines": [{"expected": d.expected, "after": d.after, "seconds": d.seconds} for d in DEADLINES],
        },
    }


def envelope_schema_ref(event_type: str) -> str:
    """Where, in the document, the schema of a whole envelope of `event_type` is."""
    return SCHEMA_REF.format(model=f"{event_type}Envelope")


def envelope_schema(document: dict[str, Any], event_type: str) -> dict[str, Any]:
    """A self-contained JSON Schema (2020-12) an envelope of `event_type` must satisfy, taken from
    `document`: what a consumer (or a test) hands a JSON Schema validator."""
    return {"$ref": envelope_schema_ref(event_type), "components": document["components"]}


def _schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {"Envelope": _hoisted(Envelope.model_json_schema(ref_template=SCHEMA_REF), {})}
    for name, cls in EVENT_TYPES.items():
        schemas[name] = _hoisted(cls.model_json_schema(ref_template=SCHEMA_REF), schemas)
        if cls.schema_version != 1:  # Written beside the fields past version 1 (events/versions.py).
            schemas[name]["properties"][SCHEMA_VERSION_KEY] = {"const": cls.schema_version}
            schemas[name].setdefault("required", []).append(SCHEMA_VERSION_KEY)
        schemas[f"{name}Envelope"] = {
            "allOf": [{"$ref": SCHEMA_REF.format(model="Envelope")}],
            "properties": {"type": {"const": name}, "data": {"$ref": SCHEMA_REF.format(model=name)}},
        }
    return schemas


def _hoisted(schema: dict[str, Any], into: dict[str, Any]) -> dict[str, Any]:
    """`schema` without its `$defs`, which go into `into` (the document's components.schemas)."""
    into.update(schema.pop("$defs", {}))
    return schema


def _channel(name: str) -> dict[str, Any]:
    return {
        "address": f"{SUBJECT_PREFIX}.{{task_id}}.{name}",
        "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        "parameters": {"task_id": {"description": "the task's id (16 lowercase hex digits)"}},
    }


def _operation(name: str) -> dict[str, Any]:
    return {"action": "receive", "channel": {"$ref": f"#/channels/{name}"},
            "messages": [{"$ref": f"#/channels/{name}/messages/{name}"}]}


def _message(cls: type[BaseEvent]) -> dict[str, Any]:
    doc = inspect.getdoc(cls) or ""
    return {
        "name": cls.type,
        "title": cls.type,
        "summary": doc.split("\n", 1)[0],
        "description": doc,
        "contentType": "application/json",
        "payload": {"$ref": envelope_schema_ref(cls.type)},
        "x-emitter": cls.emitter,
        "x-schema-version": cls.schema_version,
    }
