"""Choosing a provider at submit: an unknown or unconfigured one is refused with what to change."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.api import Api
from tests.support.processes import BatonStack, running_stack

pytestmark = pytest.mark.capability


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    with running_stack(tmp_path_factory.mktemp("hetzner-submit")) as running:
        yield running


@pytest.mark.parametrize(("provider", "message"), [
    ("aws", "unknown provider 'aws': known providers are local, hetzner"),
    ("hetzner", "provider 'hetzner' is not configured here: set BATON_HCLOUD_TOKEN, BATON_VM_NATS_URL, "
                "BATON_VM_GATEWAY_URL"),
])
def test_a_task_on_an_unusable_provider_is_refused_saying_what_to_change(stack, provider, message):
    api = Api(stack.api, stack.token)
    before = len(api.http.get("/api/tasks").json()["tasks"])

    response = api.http.post("/api/tasks", json={"repo": "file:///tmp/x.git", "prompt": "echo hi",
                                                 "provider": provider})

    assert response.status_code == 422 and message in response.text
    assert len(api.http.get("/api/tasks").json()["tasks"]) == before  # nothing recorded
