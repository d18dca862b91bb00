"""Every Baton service, said once: `baton up` starts these, health requires them, the audit reads
the stores of those that produce events, docker-compose runs each, `baton handlers` lists what
each handles.

This module imports nothing of Baton's: anything may read it (the heartbeat board, the CLI).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceEntry:
    name: str
    """As `baton service NAME` runs it, its bus credential, its store and its consumers' prefix."""
    module: str
    """The composition root (`python -m services.cli.main service NAME` runs its `run(settings)`)."""
    produces_events: bool
    """It records events in its own store and relays them: the audit's sources."""
    required_for_health: bool
    """`/api/health` is degraded while its heartbeat is missing."""
    handlers: str | None
    """`"module:Class"`: the class whose methods declare the events it handles (`@handles`);
    None for a service that handles no event (the gateway)."""

    def handler_class(self) -> type | None:
        """The class `handlers` names, imported (nothing is constructed)."""
        if self.handlers is None:
            return None
        module, _, qualname = self.handlers.partition(":")
        found: object = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
        assert isinstance(found, type), f"{self.handlers} is not a class"
        return found


SERVICES: tuple[ServiceEntry, ...] = (
    ServiceEntry("gateway", "services.gateway.main", produces_events=True, required_for_health=True,
                 handlers=None),
    ServiceEntry("task-runner", "services.task_runner.main", produces_events=True, required_for_health=True,
                 handlers="services.task_runner.handlers:TaskRunnerHandlers"),
    ServiceEntry("provisioner", "services.provisioner.main", produces_events=True, required_for_health=True,
                 handlers="services.provisioner.handlers:ProvisionerHandlers"),
    ServiceEntry("projector", "services.projector.main", produces_events=False, required_for_health=True,
                 handlers="services.projector.handlers:Projector"),
    ServiceEntry("monitor", "services.monitor.main", produces_events=True, required_for_health=True,
                 handlers="services.monitor.handlers:Monitor"),
    ServiceEntry("notifier", "services.notifier.main", produces_events=True, required_for_health=True,
                 handlers="services.notifier.handlers:Notifier"),
    ServiceEntry("pull-requests", "services.pull_requests.main", produces_events=True, required_for_health=True,
                 handlers="services.pull_requests.handlers:PullRequests"),
)

SERVICE_NAMES: tuple[str, ...] = tuple(entry.name for entry in SERVICES)
EVENT_PRODUCERS: tuple[str, ...] = tuple(entry.name for entry in SERVICES if entry.produces_events)
REQUIRED_FOR_HEALTH: tuple[str, ...] = tuple(entry.name for entry in SERVICES if entry.required_for_health)


def service_named(name: str) -> ServiceEntry:
    """The entry of service `name`; KeyError naming the services there are."""
    for entry in SERVICES:
        if entry.name == name:
            return entry
    raise KeyError(f"unknown service {name!r}; one of {', '.join(SERVICE_NAMES)}")
