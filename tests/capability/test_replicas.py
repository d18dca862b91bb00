"""`baton up --replicas 2`: two processes of each service, sharing each service's store (SQLite
here); a task submitted to either gateway completes while a replica of every service is killed."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from events import TERMINAL_TYPES

from services.cli.data_dir_processes import process_environ
from services.cli.supervisor import SERVICE_NAMES
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.gate import gate
from tests.support.processes import BatonStack, NatsServer
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

REPLICAS = 2


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    root = tmp_path_factory.mktemp("replicas")
    nats = NatsServer(store_dir=root / "nats", trusting=root / "baton").start()
    try:
        stack = BatonStack(nats=nats, data_dir=root / "baton", replicas=REPLICAS).start()
        try:
            for index in range(1, REPLICAS):  # `start` waited for the first.
                wait_for(lambda: gateway_healthy(stack, index), timeout_s=60, what=f"gateway-{index} healthy")
            yield stack
        finally:
            stack.stop()
    finally:
        nats.stop()


def warm_pool_members(stack: BatonStack, replica: int, *, started: bool = True) -> list[str]:
    """The state dirs of provisioner `replica`'s warm pool (`started`: only members with a pid)."""
    pool = stack.data_dir / "vm_agents" / f"pool-{replica}"
    return [path.name for path in pool.glob("*") if not started or (path / "pid").exists()]


def gateway_healthy(stack: BatonStack, index: int) -> bool:
    health = httpx.get(f"http://127.0.0.1:{stack.port + index}/api/health", timeout=10)
    return health.status_code == 200 and health.json()["status"] == "ok"


def gateway(stack: BatonStack, index: int) -> Api:
    return Api(f"http://127.0.0.1:{stack.port + index}", stack.token)


def test_each_service_runs_as_replicas_that_know_their_place_and_every_gateway_answers(replicated: BatonStack):
    for name in SERVICE_NAMES:
        places = [process_environ(replicated.service_pid(f"{name}-{i}")).get("BATON_REPLICA") for i in range(REPLICAS)]
        assert places == [f"{i}/{REPLICAS}" for i in range(REPLICAS)], name
    assert all(gateway_healthy(replicated, index) for index in range(REPLICAS))


def test_a_viewer_follows_a_task_live_on_one_gateway_and_resumes_on_the_other(replicated: BatonStack, origin: Path):
    # Submitted through gateway 0, watched live through gateway 1 until the agent waits at the
    # gate; then resumed through gateway 0 from the last sequence seen: one whole history.
    nonce = secrets.token_hex(4)
    first, second = gateway(replicated, 0), gateway(replicated, 1)
    with gate() as the_gate:
        prompt = (f"echo 'before {nonce}'\n{the_gate.wait_command()}"
                  f"for i in 1 2 3; do echo \"after $i {nonce}\"; done\n")
        task_id = first.submit(repo=origin.as_uri(), prompt=prompt, agent="shell")["task_id"]

        async def watch_until_before() -> list[dict]:
            seen: list[dict] = []
            async with asyncio.timeout(120), second.stream(f"/api/tasks/{task_id}/stream") as socket:
                async for raw in socket:
                    seen.append(json.loads(raw))
                    if f"before {nonce}" in seen[-1]["data"].get("text", ""):
                        return seen
            raise AssertionError("gateway 1's stream closed before the agent's first line")

        live = asyncio.run(watch_until_before())
        the_gate.open()

        async def resume() -> list[dict]:
            rest: list[dict] = []
            path = f"/api/tasks/{task_id}/stream?from_seq={live[-1]['stream_seq'] + 1}"
            async with asyncio.timeout(120), first.stream(path) as socket:
                async for raw in socket:
                    rest.append(json.loads(raw))
                    if rest[-1]["type"] in TERMINAL_TYPES:
                        return rest
            raise AssertionError("gateway 0's stream closed before the task ended")

        rest = asyncio.run(resume())
    assert rest[-1]["type"] == "TaskCompleted", rest[-1]
    history = first.events(task_id)
    assert [(e["stream_seq"], e["event_id"]) for e in live + rest] == \
        [(e["stream_seq"], e["event_id"]) for e in history]
    said = "".join(e["data"]["text"] for e in live + rest if e["type"] == "AgentOutput")
    assert said.index(f"before {nonce}") < said.index(f"after 3 {nonce}")


@pytest.mark.parametrize("killed", range(REPLICAS))
def test_a_task_completes_through_the_other_gateway_when_one_replica_of_every_service_is_killed(
        replicated: BatonStack, origin: Path, killed: int):
    other = (killed + 1) % REPLICAS
    others_members = wait_for(lambda: set(warm_pool_members(replicated, other)), timeout_s=60,
                              what=f"provisioner-{other}'s warm pool")
    # kill -9 replica `killed` of every service at once: whichever held a store's relay lease,
    # the other replica of that service takes over.
    for name in SERVICE_NAMES:
        replicated.kill_service(f"{name}-{killed}")
    api = gateway(replicated, other)
    task = api.submit(repo=origin.as_uri(), prompt="echo replicated > out.txt\necho done", agent="shell")
    events = assert_flow_completes(api, task["task_id"], timeout_s=120)
    # Every event once; the prompt delivered once.
    assert not [id_ for id_, n in Counter(e["event_id"] for e in events).items() if n > 1]
    assert [e["type"] for e in events].count("PromptDelivered") == 1
    # The restarted provisioner cleared its own warm pool (what its killed self left) and made a
    # new one; the other's it left alone.
    wait_for(lambda: warm_pool_members(replicated, killed), timeout_s=60,
             what=f"the restarted provisioner-{killed}'s warm pool")
    assert others_members <= set(warm_pool_members(replicated, other, started=False))
    # The restarted gateway tells the same story.
    wait_for(lambda: gateway_healthy(replicated, killed), timeout_s=60, what=f"gateway-{killed} back")
    assert [e["event_id"] for e in gateway(replicated, killed).events(task["task_id"])] == \
        [e["event_id"] for e in events]
