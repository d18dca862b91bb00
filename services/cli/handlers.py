"""`baton handlers`: for every event of events/, who emits it and which service's handler acts on
it, read from the service registry and each handler class's declarations (nothing is started)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Annotated

import typer

from events.catalog import EVENT_TYPES
from services.registry import SERVICES
from services.runtime.handlers import EVERY_EVENT, declared_handler_names


@dataclass(frozen=True)
class Acting:
    service: str
    handler: str
    """Qualified, e.g. `TaskRunnerHandlers.on_task_submitted`."""


@dataclass(frozen=True)
class EventHandlers:
    event: str
    emitter: str
    handled_by: list[Acting] = field(default_factory=list)
    """The services whose handler is declared for this event type (not counting EVERY_EVENT's)."""


@dataclass(frozen=True)
class HandlerListing:
    events: list[EventHandlers]
    every_event: list[Acting]
    """Handlers that take every event (the audit log)."""

    @property
    def unhandled(self) -> list[str]:
        return [listed.event for listed in self.events if not listed.handled_by]


def handler_listing() -> HandlerListing:
    """Every event type of events/, in the catalog's order, with the handlers declared for it."""
    declared: dict[str, list[Acting]] = {}
    for entry in SERVICES:
        cls = entry.handler_class()
        if cls is None:
            continue
        for event_type, handler in declared_handler_names(cls).items():
            declared.setdefault(event_type, []).append(Acting(entry.name, handler))
    events = [EventHandlers(name, cls.emitter, declared.get(name, [])) for name, cls in EVENT_TYPES.items()]
    return HandlerListing(events, declared.get(EVERY_EVENT, []))


def handlers(as_json: Annotated[bool, typer.Option("--json", help="one JSON document")] = False) -> None:
    """Which service acts on each event, and by which handler (as each handler declares it)."""
    listing = handler_listing()
    if as_json:
        print(json.dumps({"events": [asdict(listed) for listed in listing.events],
                          "every_event": [asdict(acting) for acting in listing.every_event],
                          "unhandled": listing.unhandled}, indent=2))
        return
    rows = [("EVENT", "EMITTED BY", "SERVICE", "HANDLER")]
    for listed in listing.events:  # One row per handler, each naming its event (`| grep WorkspaceReady`).
        rows += [(listed.event, listed.emitter, acting.service, acting.handler) for acting in listed.handled_by]
        rows += [] if listed.handled_by else [(listed.event, listed.emitter, "-", "nobody handles it")]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    for acting in listing.every_event:
        print(f"\nEvery event also goes to {acting.service} ({acting.handler}).")
