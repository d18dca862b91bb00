"""`baton up --replicas 2`: two processes of each service, sharing each service's store (SQLite
here); a task submitted to either gateway completes while a replica of every service is killed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.cli.supervisor import SERVICE_NAMES, _environ
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.processes import BatonStack, NatsServer

pytestmark = pytest.mark.capability

REPLICAS = 2


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    root = tmp_path_factory.mktemp("replicas")
    nats = NatsServer(store_dir=root / "nats", trusting=root / "baton").start()
    try:
        stack = BatonStack(nats=nats, data_dir=root / "baton", replicas=REPLICAS).start()
        try:
            yield stack
        finally:
            stack.stop()
    finally:
        nats.stop()


def gateway(stack: BatonStack, index: int) -> Api:
    return Api(f"http://127.0.0.1:{stack.port + index}", stack.token)


def test_each_service_runs_as_replicas_that_know_their_place_and_every_gateway_answers(replicated: BatonStack):
    for name in SERVICE_NAMES:
        places = [_environ(replicated.service_pid(f"{name}-{i}")).get("BATON_REPLICA") for i in range(REPLICAS)]
        assert places == [f"{i}/{REPLICAS}" for i in range(REPLICAS)], name
    for index in range(REPLICAS):
        health = httpx.get(f"http://127.0.0.1:{replicated.port + index}/api/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize("killed", range(REPLICAS))
def test_a_task_completes_through_the_other_gateway_when_one_replica_of_every_service_is_killed(
        replicated: BatonStack, origin: Path, killed: int):
    # kill -9 replica `killed` of every service at once: whichever held a store's relay lease,
    # the other replica of that service takes over.
    for name in SERVICE_NAMES:
        replicated.kill_service(f"{name}-{killed}")
    api = gateway(replicated, (killed + 1) % REPLICAS)
    task = api.submit(repo=origin.as_uri(), prompt="echo replicated > out.txt\necho done", agent="shell")
    events = assert_flow_completes(api, task["task_id"], timeout_s=120)
    # Every event once; the prompt delivered once.
    assert not [id_ for id_, n in Counter(e["event_id"] for e in events).items() if n > 1]
    assert [e["type"] for e in events].count("PromptDelivered") == 1
    # The other gateway tells the same story.
    assert [e["event_id"] for e in gateway(replicated, killed).events(task["task_id"])] == \
        [e["event_id"] for e in events]
