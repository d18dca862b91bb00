"""Which events a service handles, said once, next to each handler.

    class TaskRunnerHandlers:
        @handles(TaskSubmitted)
        async def on_task_submitted(self, envelope, tracking): ...

`declared_handlers(runner)` is then the map `serve()` takes (event type -> bound handler), and
`declared_handler_names(TaskRunnerHandlers)` says the same without constructing anything (what
`baton handlers` lists). A handler takes event classes, or type names where a service handles a
computed list (`@handles(*WATCHED_TYPES)`); `@handles_every_event` takes every event of every
task (the audit log: its key is `EVERY_EVENT`). Two handlers of one class claiming one type is
an error, raised when the class's declarations are read (at a service's start, by `baton handlers`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from events.catalog import EVENT_TYPES, BaseEvent
from services.runtime.consumer import ALL_EVENTS, Handler

EVERY_EVENT = ALL_EVENTS
"""The key of a handler that takes every event (`@handles_every_event`)."""

_HANDLES = "__baton_handles__"
"""Where a handler's function keeps the event types it was declared for."""

F = TypeVar("F", bound=Callable[..., Any])


class HandlerDeclarationError(TypeError):
    """A handler declared wrongly: no event, an unknown event type, a sync function, or two
    handlers of one class claiming one type. The message names the class, type and methods."""


def handles(*events: type[BaseEvent] | str) -> Callable[[F], F]:
    """Declare the decorated async handler `(envelope, tracking)` as the one for each of `events`."""
    if not events:
        raise HandlerDeclarationError("@handles() names no event: give it event classes or type names")
    return _marking(tuple(dict.fromkeys(_type_name(event) for event in events)))


def handles_every_event(handler: F) -> F:
    """Declare the decorated async handler as taking every event of every task, in stream order."""
    return _marking((EVERY_EVENT,))(handler)


def _marking(types: tuple[str, ...]) -> Callable[[F], F]:
    def mark(handler: F) -> F:
        function = _function_of(handler)
        if not inspect.iscoroutinefunction(function):
            raise HandlerDeclarationError(f"{function.__qualname__} handles {', '.join(types)} but is not "
                                          f"`async def` (the consumer awaits each handler)")
        setattr(function, _HANDLES, (*getattr(function, _HANDLES, ()), *types))
        return handler
    return mark


def _type_name(event: type[BaseEvent] | str) -> str:
    name = event.type if isinstance(event, type) and issubclass(event, BaseEvent) else event
    if not isinstance(name, str) or name not in EVENT_TYPES:
        raise HandlerDeclarationError(f"@handles({event!r}): not an event of events/ "
                                      f"(an event class, or one of {', '.join(EVENT_TYPES)})")
    return name


def _function_of(attribute: object) -> Any:
    return attribute.__func__ if isinstance(attribute, (staticmethod, classmethod)) else attribute


def _declared_types(attribute: object) -> tuple[str, ...]:
    function = _function_of(attribute)
    return getattr(function, _HANDLES, ()) if inspect.isfunction(function) else ()


def _declarations(owner: object) -> dict[str, str]:
    """Event type -> the name of the attribute of `owner` (a class, or a module) declared for it."""
    found: dict[str, str] = {}
    for name in dir(owner):
        for event_type in _declared_types(inspect.getattr_static(owner, name, None)):
            if found.setdefault(event_type, name) != name:
                raise HandlerDeclarationError(
                    f"{getattr(owner, '__qualname__', getattr(owner, '__name__', owner))}: {event_type} is "
                    f"claimed by both {found[event_type]} and {name}; one handler per event type")
    return found


def declared_handlers(obj: object) -> dict[str, Handler]:
    """Event type -> `obj`'s handler for it, bound (`obj`: an instance of a class whose methods are
    declared, or a module whose functions are)."""
    owner = obj if inspect.ismodule(obj) or inspect.isclass(obj) else type(obj)
    return {event_type: getattr(obj, name) for event_type, name in _declarations(owner).items()}


def declared_handler_names(cls: type) -> dict[str, str]:
    """Event type -> the qualified name of `cls`'s handler for it (e.g. `Monitor.on_event`),
    read from the class alone: nothing is constructed."""
    return {event_type: _function_of(inspect.getattr_static(cls, name)).__qualname__
            for event_type, name in _declarations(cls).items()}
