"""The shape every event-sourced service runs in: relay, heartbeats, consumers, its own loops."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from services.runtime.bus import Bus
from services.runtime.consumer import (
    Handler,
    Subscription,
    consume,
    subscriptions_for,
)
from services.runtime.heartbeat import send_heartbeats
from services.runtime.relay import Relay
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore

CANCEL_AGAIN_S = 0.1
"""While stopping, a loop still running after this long is cancelled again (see `_run_all`)."""


async def serve(
    bus: Bus,
    *,
    name: str,
    settings: Settings,
    store: ServiceStore,
    handlers: dict[str, Handler] | None = None,
    subscriptions: list[Subscription] | None = None,
    loops: tuple[Awaitable[None], ...] = (),
    details: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """Relay the store to the bus and handle the subscriptions (or `handlers`' event types),
    until cancelled; `details` goes out with each heartbeat (shown in `/api/health`)."""
    subscriptions = [*(subscriptions or ()), *subscriptions_for(handlers or {})]
    await _run_all(
        Relay(store, bus).run(),
        send_heartbeats(bus.nc, name, faults=settings.faults, details=details),
        *loops,
        *(consume(bus, service=name, subscription=sub, store=store) for sub in subscriptions),
    )


async def _run_all(*loops: Awaitable[None]) -> None:
    """Run the service's long-lived loops; if one dies the process exits (its supervisor
    restarts it); when cancelled, stop them all, promptly.

    Like `consumer.run_all`, except that a loop is cancelled again and again until it has
    ended: one cancellation can be lost (Python 3.11's `asyncio.wait_for` returns the result
    instead of raising when what it waits for completes as it is cancelled, and the relay's
    loop then goes on waiting), and a stop must not wait on that.
    """
    running = [asyncio.ensure_future(loop) for loop in loops]
    try:
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_EXCEPTION)
        for finished in done:
            finished.result()
    finally:
        pending = {task for task in running if not task.done()}
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
        for task in running:  # Retrieve each outcome: no "exception was never retrieved".
            if not task.cancelled():
                task.exception()
