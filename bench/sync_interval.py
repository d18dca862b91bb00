"""What JetStream's `sync_interval: always` (an fsync before each PubAck) costs, against the
default (fsync every 2 minutes), for Baton-like publishing, both in the same run.

    .venv/bin/python -m bench.sync_interval [--messages 20000] [--size 200] [--one-by-one 500] [--nodes 3]

Two shapes: a relay's batches (publish many with async acks, then wait for all of them) and a
handler's single events (publish, await the ack, next). Each setting gets fresh servers: one
node with a stream of 1 replica, and (`--nodes 3`) also a local cluster with a stream of 3
(all nodes on this machine's one disk: an upper bound on what the fsyncs cost a real cluster).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nats

from services.runtime.nats_server import nats_server_binary
from tests.support.processes import free_port
from tests.support.waiting import wait_for

SUBJECT = "baton.task.t1.AgentOutput"


def node_config(root: Path, name: str, sync_interval: str | None, routes: list[int], cluster_port: int) -> str:
    setting = f", sync_interval: {sync_interval}" if sync_interval else ""
    config = f'server_name: {name}\njetstream {{ store_dir: "{root / name}"{setting} }}\n'
    if routes:
        listed = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in routes)
        config += f"cluster {{ name: bench, listen: 127.0.0.1:{cluster_port}, routes: [{listed}] }}\n"
    return config


@contextlib.contextmanager
def servers(root: Path, sync_interval: str | None, nodes: int) -> Iterator[str]:
    """`nodes` nats-servers (a cluster when more than one); yields a URL of one of them."""
    ports, cluster_ports = [free_port() for _ in range(nodes)], [free_port() for _ in range(nodes)]
    routes = cluster_ports if nodes > 1 else []
    started = []
    try:
        for index, (port, cluster_port) in enumerate(zip(ports, cluster_ports)):
            config = root / f"n{index}.conf"
            config.write_text(node_config(root, f"n{index}", sync_interval, routes, cluster_port))
            started.append(subprocess.Popen([nats_server_binary(), "-c", str(config), "-a", "127.0.0.1",
                                             "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            wait_for(lambda: socket.create_connection(("127.0.0.1", port), 0.5).close() or True,
                     timeout_s=20, what=f"nats-server on port {port}")
        yield f"nats://127.0.0.1:{ports[0]}"
    finally:
        for server in started:
            server.terminate()
            server.wait(10)


async def add_stream(js, replicas: int) -> None:
    """A cluster takes a few seconds to elect its JetStream leader: retry until the stream is made."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await js.add_stream(name="BENCH", subjects=["baton.task.>"], num_replicas=replicas)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def measure(url: str, *, replicas: int, messages: int, size: int, one_by_one: int, window: int = 2000) -> dict:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await add_stream(js, replicas)
        payload = b"x" * size
        started = time.perf_counter()
        for first in range(0, messages, window):  # A relay's batches: acks awaited per window.
            acks = [await js.publish_async(SUBJECT, payload, headers={"Nats-Msg-Id": f"b{n}"})
                    for n in range(first, min(first + window, messages))]
            await asyncio.gather(*acks)
        batched_s = time.perf_counter() - started
        started = time.perf_counter()
        for n in range(one_by_one):  # A handler's single events: each ack awaited before the next.
            await js.publish(SUBJECT, payload, headers={"Nats-Msg-Id": f"s{n}"})
        single_s = time.perf_counter() - started
        return {"batched_per_s": messages / batched_s, "single_ms": 1000 * single_s / max(one_by_one, 1)}
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=200)
    parser.add_argument("--one-by-one", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=1, help="also measure a local cluster of this many (R3)")
    args = parser.parse_args()
    shapes = [1] + ([args.nodes] if args.nodes > 1 else [])
    for nodes in shapes:
        for setting in (None, "always"):
            with tempfile.TemporaryDirectory(prefix="baton-sync-") as root, \
                    servers(Path(root), setting, nodes) as url:
                result = asyncio.run(measure(url, replicas=min(nodes, 3), messages=args.messages, size=args.size,
                                             one_by_one=args.one_by_one))
            print(f"{nodes} node(s), sync_interval {setting or 'default (2m)':>13}: "
                  f"{result['batched_per_s']:8.0f} msg/s batched ({args.messages} x {args.size} B, async acks), "
                  f"{result['single_ms']:6.2f} ms per single publish ({args.one_by_one}, each ack awaited)",
                  flush=True)


if __name__ == "__main__":
    main()
