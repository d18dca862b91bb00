"""Baton on a 3-node JetStream cluster with two replicas of every service on PostgreSQL: while
ten tasks run, NATS nodes (the stream's leader first) and replicas of every service are killed -9
in rounds, and nothing is lost, doubled or reordered."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from events import STREAM
from events.envelope import STREAM_SUBJECTS
from services.runtime.streams import stream_events
from services.cli.supervisor import SERVICE_NAMES
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.gate import Gate, gate
from tests.support.nats_cluster import NatsCluster, running_nats_cluster, stream_leader
from tests.support.postgres import fresh_postgres_database
from tests.support.processes import BatonStack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

TASKS = 10


def prompt(until: Gate) -> str:
    """A line every half second until the test has done its rounds (a loaded machine makes the
    rounds slow, and a task that ended before the last one would leave nothing to move on), then
    how many lines it wrote."""
    return (f"i=0\nuntil {until.is_open_command()}; do i=$((i+1)); echo line-$i; sleep 0.5; done\n"
            "echo lines-$i\necho done > out.txt\n")


@pytest.fixture(scope="module")
def cluster_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BatonStack, NatsCluster]]:
    root = tmp_path_factory.mktemp("cluster")
    with fresh_postgres_database() as database_url, \
            running_nats_cluster(root / "nats", trusting=root / "baton") as cluster:
        stack = BatonStack(nats=cluster, data_dir=root / "baton", replicas=2, database_url=database_url,
                           extra_env={"BATON_LOG_FORMAT": "json", "BATON_LOG_LEVEL": "debug",
                                      "BATON_MAX_RUNNING_TASKS": str(TASKS)}).start()
        try:
            yield stack, cluster
        finally:
            stack.stop()


@pytest.fixture
def rounds_done() -> Iterator[Gate]:
    """Shut while the test kills things; the tasks run until it opens."""
    with gate() as shut:
        yield shut


async def stream_facts(stack: BatonStack, cluster: NatsCluster) -> tuple[str | None, int, list[str]]:
    """(the stream's leader, its replicas, every event id on it in stream order), as an auditor reads them."""
    nc = await nats.connect(servers=cluster.url.split(","), user_credentials=stack.nats_credentials("auditor"))
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        ids = [event["event_id"] async for batch in stream_events(js, STREAM_SUBJECTS[0], follow=False)
               for event in batch]
        return await stream_leader(js, STREAM), info.config.num_replicas, ids
    finally:
        await nc.close()


def handled_in_order(stack: BatonStack) -> dict[str, list[str]]:
    """Per consumer, the tasks whose events it handled out of stream order or twice (the services'
    debug lines `handled`, from every replica's log)."""
    seen: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
    for log in sorted((stack.data_dir / "logs").glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if '"handled_task"' not in line:
                continue
            record = json.loads(line)
            seen[(record["consumer"], record["handled_task"])].append((record["time"], record["stream_seq"]))
    wrong: dict[str, list[str]] = defaultdict(list)
    for (consumer, task_id), handled in seen.items():
        seqs = [seq for _, seq in sorted(handled)]
        if len(set(seqs)) != len(seqs) or seqs != sorted(seqs):
            wrong[consumer].append(task_id)
    return dict(wrong)


def outputs_per_attempt(events: list[dict]) -> list[list[dict]]:
    attempts: list[list[dict]] = [[]]
    for event in events:
        if event["type"] == "AttemptStarted":
            attempts.append([])
        elif event["type"] == "AgentOutput":
            attempts[-1].append(event)
    return [outputs for outputs in attempts if outputs]


def test_nothing_is_lost_doubled_or_reordered_while_nats_nodes_and_replicas_die(
        cluster_stack: tuple[BatonStack, NatsCluster], origin: Path, rounds_done: Gate):
    stack, cluster = cluster_stack
    api = Api(stack.api, stack.token)
    leader, replicas, _ = asyncio.run(stream_facts(stack, cluster))
    assert replicas == 3 and leader is not None  # The stream was made R3 on the cluster.
    tasks = [api.submit(repo=origin.as_uri(), prompt=prompt(until=rounds_done), agent="shell")["task_id"]
             for _ in range(TASKS)]

    # Three rounds: kill -9 one NATS node (the stream's leader in the first) and one replica of
    # every service, let the tasks go on, bring the node back.
    def events_so_far() -> int:
        return sum(len(api.events(task_id)) for task_id in tasks)

    for round_ in range(3):
        # (Right after the last round's node came back the stream may still be electing: 503, retried.)
        [before] = wait_for(lambda: (events_so_far(),), timeout_s=60, what="the tasks' events so far")
        node = asyncio.run(stream_facts(stack, cluster))[0] if round_ == 0 else f"n{round_}"
        cluster.kill(node)
        for name in SERVICE_NAMES:
            stack.kill_service(f"{name}-{round_ % 2}")
        wait_for(lambda: events_so_far() > before + TASKS, timeout_s=120,
                 what=f"round {round_}: the tasks move on with {node} down")
        cluster.restart(node)
    rounds_done.open()

    for task_id in tasks:
        events = assert_flow_completes(api, task_id, timeout_s=300)
        # One PromptDelivered per attempt; every output line once, in order, per attempt.
        sessions = Counter(e["data"]["session_id"] for e in events if e["type"] == "PromptDelivered")
        assert set(sessions.values()) == {1}, (task_id, sessions)
        attempts = outputs_per_attempt(events)
        for outputs in attempts:
            assert [o["data"]["seq"] for o in outputs] == list(range(1, len(outputs) + 1)), task_id
            lines = [line for line in "".join(o["data"]["text"] for o in outputs).split() if line.startswith("line-")]
            assert lines == [f"line-{i}" for i in range(1, len(lines) + 1)], task_id
        # The last attempt's own count of its lines: none went missing at the end either.
        words = "".join(o["data"]["text"] for o in attempts[-1]).split()
        assert [w for w in words if w.startswith("lines-")] == [f"lines-{sum(w.startswith('line-') for w in words)}"]

    # Every event on the stream once.
    _, _, ids = asyncio.run(stream_facts(stack, cluster))
    assert not [event_id for event_id, n in Counter(ids).items() if n > 1]
    # Each service saw each task's events once, in stream order, whichever replica handled them.
    assert handled_in_order(stack) == {}
    handled_by = {consumer.rsplit("-", 1)[0] for consumer in _consumers(stack)}
    assert {"task-runner", "provisioner", "monitor", "projector"} <= handled_by
    # No service gave up on its own while nodes died: every exit `baton up` saw was one of our kill -9s.
    exits = [line for line in stack.log_path.read_text().splitlines() if " exited with code " in line]
    assert [line for line in exits if "exited with code -9;" not in line] == []
    assert len(exits) == 3 * len(SERVICE_NAMES)


def _consumers(stack: BatonStack) -> set[str]:
    names = set()
    for log in (stack.data_dir / "logs").glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if '"handled_task"' in line:
                names.add(json.loads(line)["consumer"])
    return names
