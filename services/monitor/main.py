"""Composition root of the flow monitor process."""

from __future__ import annotations

from services.monitor.handlers import Monitor
from services.runtime.bus import open_bus
from services.runtime.consumer import consume, run_all, subscriptions_for
from services.runtime.heartbeat import send_heartbeats
from services.runtime.relay import Relay
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore, store_env

NAME = "monitor"


async def run(settings: Settings) -> None:
    store = ServiceStore(NAME, store_env(settings, NAME))
    monitor = Monitor(store, settings.flow_deadlines, stall_after_s=settings.stall_after_s)
    monitor.resume()
    async with open_bus(settings.nats_url, name=NAME) as bus:
        await run_all(
            Relay(store, bus).run(),
            monitor.run_ticks(),
            send_heartbeats(bus.nc, NAME, faults=settings.faults),
            *(
                consume(bus, service=NAME, subscription=sub, store=store)
                for sub in subscriptions_for(monitor.handlers())
            ),
        )
