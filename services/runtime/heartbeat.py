"""Liveness on the bus: every process says it is alive once a second on `baton.heartbeat.<name>`."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client

from services.registry import REQUIRED_FOR_HEALTH

HEARTBEAT_SUBJECT = "baton.heartbeat"
REQUIRED_SERVICES = REQUIRED_FOR_HEALTH


async def send_heartbeats(
    nc: Client,
    service: str,
    *,
    faults: frozenset[str],
    details: Callable[[], dict[str, Any]] | None = None,
    interval_s: float = 1.0,
    replica: int = 0,
) -> None:
    """`details`, if given, is what the service reports about itself in `/api/health`; `replica`:
    which of its service's replicas this process is (HeartbeatBoard.replica_alive)."""
    body: dict[str, Any] = {"service": service, "pid": os.getpid(), "faults": sorted(faults), "replica": replica}
    while True:
        if nc.is_connected:
            if details is not None:
                body["details"] = details()
            await nc.publish(f"{HEARTBEAT_SUBJECT}.{service}", json.dumps(body).encode())
        await asyncio.sleep(interval_s)


@dataclass
class HeartbeatBoard:
    """Who was heard from, and when (monotonic seconds): each service, and each of its replicas."""

    stale_after_s: float = 5.0
    last_seen: dict[str, float] = field(default_factory=dict)
    replicas_seen: dict[tuple[str, int], float] = field(default_factory=dict)
    faults: dict[str, list[str]] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    listening_since: float | None = None

    async def follow(self, nc: Client, service: str = "*") -> None:
        """Hear the heartbeats of `service` (every service: "*")."""
        async def on_beat(msg) -> None:
            body = json.loads(msg.data)
            now = time.monotonic()
            self.last_seen[body["service"]] = now
            if isinstance(body.get("replica"), int):
                self.replicas_seen[(body["service"], body["replica"])] = now
            self.faults[body["service"]] = body.get("faults", [])
            if "details" in body:
                self.details[body["service"]] = body["details"]

        await nc.subscribe(f"{HEARTBEAT_SUBJECT}.{service}", cb=on_beat)
        self.listening_since = time.monotonic()

    def status(self) -> dict[str, bool]:
        now = time.monotonic()
        return {
            name: name in self.last_seen and now - self.last_seen[name] < self.stale_after_s
            for name in REQUIRED_SERVICES
        }

    def replica_alive(self, service: str, replica: int) -> bool:
        """Whether `service`'s replica `replica` was heard within `stale_after_s`. Until the board
        has listened that long it takes every replica for alive: it may not have heard them yet."""
        now = time.monotonic()
        if self.listening_since is None or now - self.listening_since < self.stale_after_s:
            return True
        seen = self.replicas_seen.get((service, replica))
        return seen is not None and now - seen < self.stale_after_s
