"""Composition root of the provisioner process."""

from __future__ import annotations

from services.provisioner.handlers import ProvisionerHandlers
from services.provisioner.local import LocalProvider
from services.provisioner.watcher import VmAgentWatcher
from services.runtime.bus import StreamLimits, open_bus
from services.runtime.nats_auth import service_credentials
from services.runtime.service import serve
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore, store_env

NAME = "provisioner"


async def run(settings: Settings) -> None:
    store = ServiceStore(NAME, store_env(settings, NAME))
    provider = LocalProvider(settings)
    provider.pool.reset()
    async with open_bus(settings.nats_url, name=NAME, credentials=service_credentials(settings, NAME),
                       stream_limits=StreamLimits.from_settings(settings)) as bus:
        watcher = VmAgentWatcher(store, provider, bus)
        handlers = ProvisionerHandlers(store, provider, settings.faults, on_ready=watcher.watch)
        handlers.resume_unsettled()
        provider.pool.refill_soon()
        try:
            await serve(bus, name=NAME, settings=settings, store=store, handlers=handlers.handlers(),
                        loops=(watcher.run(),), details=provider.pool.status)
        finally:
            provider.pool.stop_idle()
