"""Every route of the vm_agent's debugging HTTP API that acts needs its bearer token (BATON_VM_AGENT_TOKEN), never nothing."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from vm_agent.app import create_app
from vm_agent.state import VmAgent

TOKEN = "p" * 64
ACTING = [("/assign", {}), ("/sessions", {}), ("/sessions/t-a1/cancel", {}), ("/sessions/t-a1/turns", {}),
          ("/permissions/r1", {"option_id": "once"})]


async def _no_bus(task_id: str, credentials: str | None):  # never reached: refused before
    raise AssertionError("an unauthenticated request reached the bus")


@pytest.mark.parametrize("path,body", ACTING)
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Bearer {TOKEN[:-1]}"])
def test_an_acting_route_without_the_debug_token_is_a_401(path: str, body: dict, header: str | None):
    client = TestClient(create_app(VmAgent(TOKEN, _no_bus, frozenset(), launcher=None)))
    headers = {"Authorization": header} if header else {}
    response = client.post(path, json=body, headers=headers)
    assert response.status_code == 401, (path, response.status_code, response.text)
