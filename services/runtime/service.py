"""The shape every event-sourced service runs in: relay, heartbeats, consumers, its own loops."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from services.runtime.bus import Bus
from services.runtime.consumer import Handler, Subscription, run_all, subscriptions_for
from services.runtime.partitions import HeldPartitions, consume
from services.runtime.heartbeat import HeartbeatBoard, send_heartbeats
from services.runtime.relay import Relay
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore


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
    held_partitions: HeldPartitions | None = None,
) -> None:
    """Relay the store to the bus and handle the subscriptions (or `handlers`' event types),
    until cancelled; `details` goes out with each heartbeat (shown in `/api/health`), with the
    relay's backlog (`relay_backlog`: events recorded, not yet published)."""
    subscriptions = [*(subscriptions or ()), *subscriptions_for(handlers or {})]
    relay = Relay(store, bus)
    if held_partitions is not None and not held_partitions.sole:
        replicas = HeartbeatBoard()  # Who takes a dead replica's quiet partitions.
        await replicas.follow(bus.nc, service=name)
        held_partitions.replica_alive = functools.partial(replicas.replica_alive, name)
    await run_all(
        relay.run(),
        send_heartbeats(bus.nc, name, faults=settings.faults, details=with_relay_backlog(relay, details),
                        replica=replica_of(settings)[0]),
        *loops,
        consume(bus, service=name, subscription=subscriptions, store=store, replica=replica_of(settings),
                held_partitions=held_partitions),
    )


def replica_of(settings: Settings) -> tuple[int, int]:
    """(index, count) of this process among its service's replicas (`BATON_REPLICA=i/N`)."""
    return settings.replica


def with_relay_backlog(relay: Relay, details: Callable[[], dict[str, Any]] | None) -> Callable[[], dict[str, Any]]:
    """`details` (if any) and the relay's backlog, as one heartbeat's details."""
    return lambda: {**(details() if details is not None else {}), "relay_backlog": relay.backlog()}
