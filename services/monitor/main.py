"""Composition root of the flow monitor process."""

from __future__ import annotations

from services.monitor.handlers import Monitor
from services.runtime.bus import StreamLimits, open_bus
from services.runtime.nats_auth import service_credentials
from services.runtime.partitions import HeldPartitions
from services.runtime.service import replica_of, serve
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore, store_env

NAME = "monitor"


async def run(settings: Settings) -> None:
    store = ServiceStore(NAME, store_env(settings, NAME))
    held = HeldPartitions(replica_of(settings))
    monitor = Monitor(store, settings.flow_deadlines, stall_after_s=settings.stall_after_s, held=held)
    monitor.resume()
    async with open_bus(settings.nats_url, name=NAME, credentials=service_credentials(settings, NAME),
                       stream_limits=StreamLimits.from_settings(settings)) as bus:
        await serve(bus, name=NAME, settings=settings, store=store, subscriptions=monitor.subscriptions(),
                    loops=(monitor.run_ticks(),), held_partitions=held)
