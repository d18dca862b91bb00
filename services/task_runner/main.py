"""Composition root of the task runner process."""

from __future__ import annotations

from services.runtime.bus import open_bus
from services.runtime.consumer import consume, run_all, subscriptions_for
from services.runtime.heartbeat import send_heartbeats
from services.runtime.relay import Relay
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore, store_env
from services.task_runner.handlers import TaskRunnerHandlers
from services.task_runner.vm_agent_client import VmAgentClient

NAME = "task-runner"


async def run(settings: Settings) -> None:
    store = ServiceStore(NAME, store_env(settings, NAME))
    starter = VmAgentClient(settings.install_secret())
    async with open_bus(settings.nats_url, name=NAME) as bus:
        handlers = TaskRunnerHandlers(
            store, starter, bus, overdue_backoff_s=settings.overdue_backoff_s
        )
        await run_all(
            Relay(store, bus).run(),
            send_heartbeats(bus.nc, NAME, faults=settings.faults),
            *(
                consume(bus, service=NAME, subscription=sub, store=store)
                for sub in subscriptions_for(handlers.handlers())
            ),
        )
