"""docker-compose runs every service of the registry (a service missing there is a degraded install)."""

from __future__ import annotations

import re

from services.registry import SERVICE_NAMES
from tests.support.processes import REPO_ROOT


def test_docker_compose_runs_every_registered_service_and_nothing_else():
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    # Each container: a top-level entry of `services:` running `baton service NAME` (one or more per service).
    containers = dict(re.findall(r'^  ([\w-]+):\n(?:    .*\n)*?    command: \["service", "([\w-]+)"\]', compose, re.M))
    assert set(containers.values()) == set(SERVICE_NAMES)
    for container, service in containers.items():
        assert container.startswith(service), f"container {container} runs {service}: name it after the service"
