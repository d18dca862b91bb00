"""Composition root of the task runner process."""

from __future__ import annotations

from services.runtime.bus import StreamLimits, open_bus
from services.runtime.partitions import HeldPartitions
from services.runtime.nats_auth import service_credentials
from services.runtime.service import replica_of, serve
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore, store_env
from services.task_runner.handlers import TaskRunnerHandlers
from services.task_runner.vm_agent_client import VmAgentClient

NAME = "task-runner"


async def run(settings: Settings) -> None:
    store = ServiceStore(NAME, store_env(settings, NAME))
    held = HeldPartitions(replica_of(settings))
    async with open_bus(settings.nats_url, name=NAME, credentials=service_credentials(settings, NAME),
                       stream_limits=StreamLimits.from_settings(settings)) as bus:
        handlers = TaskRunnerHandlers(
            store, VmAgentClient(bus.nc), bus, overdue_backoff_s=settings.overdue_backoff_s,
            max_running=settings.max_running_tasks, max_attempts=settings.max_attempts, held=held,
        )
        handlers.late_steps.resume()  # The checks of late handoffs a crash interrupted continue.
        await serve(bus, name=NAME, settings=settings, store=store, handlers=handlers.handlers(),
                    loops=(handlers.late_steps.run(),), held_partitions=held)
