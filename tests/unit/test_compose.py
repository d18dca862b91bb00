"""docker-compose runs every service `baton up` runs (a service missing there is a degraded install)."""

from __future__ import annotations

import re

from services.cli.supervisor import SERVICE_NAMES
from tests.support.processes import REPO_ROOT


def test_docker_compose_runs_every_service_as_its_own_container():
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    # Each service: a top-level entry of `services:` named as the service, running `baton service NAME`.
    containers = dict(re.findall(r'^  ([\w-]+):\n(?:    .*\n)*?    command: \["service", "([\w-]+)"\]', compose, re.M))
    assert containers == {name: name for name in SERVICE_NAMES}
