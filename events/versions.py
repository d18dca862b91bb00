"""Reading old events as the current shape: each event type's schema version, and its upcasters.

An event type starts at version 1 (`class X(BaseEvent, emitter=..., version=1)`). A change that is
not backward compatible (a field renamed, split, made required) raises the class's `version` and
registers one upcaster from the version before:

    @UPCASTERS.register("TaskCompleted", from_version=1)
    def _commit_becomes_commit_sha(data: dict) -> dict:
        return {**{k: v for k, v in data.items() if k != "commit"}, "commit_sha": data["commit"]}

`current_shape` runs the chain from the version an envelope says it was written in
(`data.schema_version`, 1 when absent) up to the current one. It runs once, where an envelope is
decoded off the bus (every service's consumer, `Bus.last_event`, `events.client`), and in
`parse_event`, where it finds the envelope already current: so every handler and read model sees
`envelope.data` in the current shape, while the stream and the audit log keep every envelope exactly
as it was written (the audit log's hash chain needs those bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from events.envelope import Envelope

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

SCHEMA_VERSION_KEY = "schema_version"
"""Where an envelope says which version its `data` was written in: `data.schema_version`, written
only past version 1 (so every event recorded before versions existed, and every v1 event, is
unchanged). In `data` rather than beside it, so every path that writes `data` carries it."""


class MissingUpcaster(LookupError):
    """An envelope of `event_type` written in `version` has no way to the current version."""

    def __init__(self, event_type: str, version: int, current: int) -> None:
        self.event_type, self.version, self.current = event_type, version, current
        super().__init__(f"{event_type} v{version} cannot be read as v{current}: "
                         f"no upcaster from v{version} (events/versions.py)")


class Upcasters:
    """One upcaster per (event type, version it reads), each returning the next version's data."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Upcaster] = {}

    def register(self, event_type: str, *, from_version: int) -> Callable[[Upcaster], Upcaster]:
        def add(step: Upcaster) -> Upcaster:
            if (event_type, from_version) in self._steps:
                raise ValueError(f"{event_type} already has an upcaster from v{from_version}")
            self._steps[(event_type, from_version)] = step
            return step
        return add

    def upcast(self, event_type: str, data: dict[str, Any], *, version: int, current: int) -> dict[str, Any]:
        """`data` of `event_type` as written in `version`, as `current` reads it. Data from a later
        version than `current` (a newer Baton wrote it) is returned as it is."""
        while version < current:
            step = self._steps.get((event_type, version))
            if step is None:
                raise MissingUpcaster(event_type, version, current)
            data, version = step(data), version + 1
        return data

    def missing(self, current_versions: dict[str, int]) -> list[str]:
        """Every `type vN` a current version needs an upcaster for and has none (a test keeps this empty)."""
        return [f"{name} v{v}" for name, current in current_versions.items() for v in range(1, current)
                if (name, v) not in self._steps]


UPCASTERS = Upcasters()
"""Baton's own upcasters; none yet: every event type is at version 1."""


def current_shape(envelope: Envelope) -> Envelope:
    """`envelope` with its `data` in its type's current shape (with the current `schema_version`
    beside the fields, as a current event writes it). The same envelope when it is current
    already, or of a type or a version this release does not know (a newer Baton wrote it): a
    dictionary lookup, so the flood of AgentOutput costs nothing. Raises MissingUpcaster when an
    older version has no way to the current one."""
    event_type = _event_types().get(envelope.type)
    if event_type is None:
        return envelope
    version, current = envelope.data.get(SCHEMA_VERSION_KEY, 1), event_type.schema_version
    if version >= current:
        return envelope
    written = {key: value for key, value in envelope.data.items() if key != SCHEMA_VERSION_KEY}
    data = UPCASTERS.upcast(envelope.type, written, version=version, current=current)
    return envelope.model_copy(update={"data": {**data, SCHEMA_VERSION_KEY: current}})


def _event_types() -> dict[str, Any]:
    """The catalog's event classes (imported here, not at the top: the catalog imports this module)."""
    from events.catalog import EVENT_TYPES

    return EVENT_TYPES
