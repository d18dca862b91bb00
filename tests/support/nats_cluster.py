"""A 3-node nats-server cluster with JetStream on loopback, for the tests that lose a node.

Each node has its own client, cluster and monitoring ports (free ones), its own store dir and a
server name (`n0`, `n1`, …); `cluster { routes }` names every other node. `running_nats_cluster`
starts it and returns once JetStream has a meta leader every node agrees on; `kill` (-9) and
`restart` take a node away and bring it back with the same name, ports and store.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nats.js import JetStreamContext

from services.runtime.nats_server import nats_server_binary
from tests.support.processes import free_port
from tests.support.waiting import wait_for

CLUSTER_NAME = "baton-test"


@dataclass
class ClusterNode:
    name: str
    directory: Path
    client_port: int
    cluster_port: int
    http_port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def config(self, routes: list[str]) -> str:
        return "\n".join([
            f"server_name: {self.name}",
            f"listen: 127.0.0.1:{self.client_port}",
            f"http: 127.0.0.1:{self.http_port}",
            f"jetstream {{ store_dir: {json.dumps(str(self.directory / 'jetstream'))} }}",
            "cluster {",
            f"  name: {CLUSTER_NAME}",
            f"  listen: 127.0.0.1:{self.cluster_port}",
            f"  routes: [{', '.join(routes)}]",
            "}",
            "",
        ])

    def start(self) -> None:
        with (self.directory / "nats.log").open("ab") as log:
            self.process = subprocess.Popen(
                [nats_server_binary(), "-c", str(self.directory / "nats.conf")],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def kill(self) -> None:
        """kill -9: the node vanishes mid-whatever, as a crashed machine does."""
        if self.running:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.running:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def jsz(self) -> dict:
        """The node's JetStream monitoring report (`/jsz`)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/jsz", timeout=2) as answer:
            return json.loads(answer.read())


@dataclass
class NatsCluster:
    nodes: list[ClusterNode]

    @property
    def urls(self) -> str:
        """Every node's URL, comma-separated: what `--nats-url` / BATON_NATS_URL take."""
        return ",".join(node.url for node in self.nodes)

    @property
    def server_urls(self) -> list[str]:
        """The same as a list: what `nats.connect` takes."""
        return [node.url for node in self.nodes]

    def node(self, name: str) -> ClusterNode:
        return next(node for node in self.nodes if node.name == name)

    def meta_leader(self) -> str | None:
        """The JetStream meta leader every running node names, or None while they do not agree."""
        leaders = {node.jsz().get("meta_cluster", {}).get("leader") for node in self.nodes if node.running}
        return leaders.pop() if len(leaders) == 1 and None not in leaders and "" not in leaders else None

    def wait_for_meta_leader(self, timeout_s: float = 30) -> str:
        return wait_for(self.meta_leader, timeout_s=timeout_s, what="the cluster's JetStream meta leader")

    def kill(self, name: str) -> None:
        self.node(name).kill()

    def restart(self, name: str) -> None:
        """Start a killed node again (same name, ports and store); it rejoins through its routes."""
        node = self.node(name)
        node.start()
        wait_for(lambda: node.jsz().get("meta_cluster", {}).get("leader"), timeout_s=30,
                 what=f"{name} to rejoin the cluster")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


async def stream_leader(js: JetStreamContext, stream: str) -> str | None:
    """The server name of the stream's leader (`$JS.API.STREAM.INFO`), None while it has none."""
    info = await js.stream_info(stream)
    return info.cluster.leader if info.cluster is not None else None


@contextmanager
def running_nats_cluster(directory: Path, *, size: int = 3) -> Iterator[NatsCluster]:
    """A `size`-node cluster with JetStream, up with a meta leader; every node stopped on exit."""
    nodes = [ClusterNode(f"n{i}", directory / f"n{i}", free_port(), free_port(), free_port()) for i in range(size)]
    for node in nodes:
        node.directory.mkdir(parents=True, exist_ok=True)
        routes = [f"nats-route://127.0.0.1:{other.cluster_port}" for other in nodes if other is not node]
        (node.directory / "nats.conf").write_text(node.config(routes))
    cluster = NatsCluster(nodes)
    try:
        for node in nodes:
            node.start()
        cluster.wait_for_meta_leader()
        yield cluster
    finally:
        cluster.stop()
