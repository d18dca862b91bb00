"""Composition root of the notifier process."""

from __future__ import annotations

import httpx

from services.notifier.adapters import HttpPoster, StreamTaskFacts
from services.notifier.endpoints import load_endpoints
from services.notifier.handlers import Notifier
from services.runtime.bus import StreamLimits, open_bus
from services.runtime.nats_auth import service_credentials
from services.runtime.partitions import HeldPartitions
from services.runtime.service import replica_of, serve
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore, store_env

NAME = "notifier"
REQUEST_TIMEOUT_S = 10.0


async def run(settings: Settings) -> None:
    endpoints = load_endpoints(settings)
    store = ServiceStore(NAME, store_env(settings, NAME))
    held = HeldPartitions(replica_of(settings))
    async with (
        httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, follow_redirects=False) as client,
        open_bus(settings.nats_url, name=NAME, credentials=service_credentials(settings, NAME),
                 stream_limits=StreamLimits.from_settings(settings)) as bus,
    ):
        notifier = Notifier(store, endpoints, HttpPoster(client), StreamTaskFacts(bus.js),
                            public_url=settings.public_url or f"http://{settings.host}:{settings.port}",
                            max_attempts=settings.notify_max_attempts, backoff_first_s=settings.notify_backoff_s,
                            held=held)
        notifier.resume()
        await serve(bus, name=NAME, settings=settings, store=store, subscriptions=notifier.subscriptions(),
                    loops=(notifier.run_deliveries(),), held_partitions=held,
                    details=lambda: {"endpoints": sorted(notifier.endpoints), "pending": notifier.pending_count()})
