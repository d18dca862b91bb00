"""A relay in a process of its own, as one replica of a service runs it (the tests kill it -9).

`python -m tests.support.relay_process NATS_URL STORE_NAME STORE_ENV_JSON`: relays the store to
that NATS until killed; prints `holding` once it holds the store's lease (publishes).
"""

from __future__ import annotations

import asyncio
import json
import sys

from services.runtime.bus import open_bus
from services.runtime.relay import Relay
from services.runtime.store import ServiceStore


async def relay_until_killed(nats_url: str, store_name: str, env: dict[str, str]) -> None:
    store = ServiceStore(store_name, env)
    async with open_bus(nats_url, name=f"{store_name}-relay-replica") as bus:
        relay = Relay(store, bus)
        running = asyncio.create_task(relay.run())
        while not relay.holding and not running.done():
            await asyncio.sleep(0.02)
        print("holding", flush=True)
        await running


if __name__ == "__main__":
    asyncio.run(relay_until_killed(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
