"""The spine of Baton: a task submitted over HTTP reaches the agent and comes back as a pushed branch."""

from __future__ import annotations

import hashlib
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from events import FLOW_CONTRACT
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_commit, branch_file, make_origin
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability


def nonce_prompt(nonce: str) -> str:
    return f'echo "the nonce is {nonce}"\necho "{nonce}" > hello.txt\necho "to stderr" >&2\n'


def test_submitted_task_reaches_the_agent_and_comes_back_as_a_pushed_branch(api: Api, origin: Path):
    assert_task_travels_the_whole_path(api, origin)


def test_the_task_path_works_with_every_store_on_postgresql(postgres_url: str, tmp_path: Path):
    with running_stack(tmp_path / "pg", database_url=postgres_url) as pg_stack:
        assert_task_travels_the_whole_path(Api(pg_stack.api, pg_stack.token), make_origin(tmp_path))
        # The stores really are in PostgreSQL: each service's events are in its own schema.
        with psycopg.connect(postgres_url) as db:
            counts = {
                schema: db.execute(f"SELECT count(*) FROM {schema}.{table}").fetchone()[0]
                for schema, table in (("baton_gateway", "gateway_events"),
                                      ("baton_task_runner", "task_runner_events"),
                                      ("baton_provisioner", "provisioner_events"),
                                      ("baton_projections", "tasks"))
            }
        assert all(counts.values()), counts
        assert not list((pg_stack.data_dir / "stores").glob("*.sqlite"))


def assert_task_travels_the_whole_path(api: Api, origin: Path) -> None:
    nonce = secrets.token_hex(8)
    prompt = nonce_prompt(nonce)

    # A user submits over HTTP and gets the task's id at once.
    task = api.submit(repo=origin.as_uri(), prompt=prompt, agent="shell")
    assert task["state"] == "queued"

    # Every handoff of the flow contract is on the stream, in order.
    events = assert_flow_completes(api, task["task_id"], timeout_s=90)
    types = [e["type"] for e in events]
    assert [t for t in FLOW_CONTRACT if t in types] == list(FLOW_CONTRACT)

    # The agent received exactly the submitted prompt…
    delivered = next(e for e in events if e["type"] == "PromptDelivered")
    assert delivered["data"]["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
    # …and acted on it: its output carries the nonce, in contiguous order.
    outputs = [e["data"] for e in events if e["type"] == "AgentOutput"]
    assert any(nonce in o["text"] and o["stream"] == "stdout" for o in outputs)
    assert any("to stderr" in o["text"] and o["stream"] == "stderr" for o in outputs)
    assert [o["seq"] for o in outputs] == list(range(1, len(outputs) + 1))

    # The branch is in the origin with the agent's file, at the commit the events name.
    branch = f"baton/{task['task_id']}"
    pushed = next(e for e in events if e["type"] == "BranchPushed")["data"]
    assert pushed["branch"] == branch
    assert branch_file(origin, branch, "hello.txt") == nonce
    assert branch_commit(origin, branch) == pushed["commit"]

    # The board says completed, with the branch.
    board = api.wait_for_state(task["task_id"], "completed")
    assert board["branch"] == branch

    # Stream order also holds for who-caused-what: each event after the first has a cause.
    assert events[0]["actor"] == "user"
    assert all(e["causation_id"] for e in events[1:])


def test_the_flow_check_names_the_missing_prompt_delivered_when_delivery_is_broken(
        tmp_path: Path, faulty_stack: BatonStack):
    # Rehearse the original incident: the agent starts but the prompt silently never arrives.
    api = Api(faulty_stack.api, faulty_stack.token)
    origin = make_origin(tmp_path)
    task = api.submit(repo=origin.as_uri(), prompt=nonce_prompt("x"), agent="shell")
    # The agent session does start, so what is missing is exactly the delivery.
    wait_for(lambda: any(e["type"] == "AgentSessionStarted" for e in api.events(task["task_id"])),
             timeout_s=60, what="AgentSessionStarted")
    with pytest.raises(AssertionError, match=r"missing handoff PromptDelivered \(after AgentSessionStarted\)"):
        assert_flow_completes(api, task["task_id"], timeout_s=5)


def test_ten_tasks_submitted_at_once_all_complete(api: Api, tmp_path: Path):
    origin = make_origin(tmp_path)
    nonces = [secrets.token_hex(6) for _ in range(10)]

    with ThreadPoolExecutor(max_workers=10) as pool:
        tasks = list(pool.map(
            lambda n: api.submit(repo=origin.as_uri(), prompt=nonce_prompt(n), agent="shell"), nonces
        ))

    assert len({t["task_id"] for t in tasks}) == 10
    for task, nonce in zip(tasks, nonces, strict=True):
        assert_flow_completes(api, task["task_id"], timeout_s=180)
        assert branch_file(origin, f"baton/{task['task_id']}", "hello.txt") == nonce


def test_health_shows_the_warm_vm_agent_pool_growing_to_a_burst_and_filling_up(api: Api, origin: Path):
    """Tasks take warm vm_agents; the provisioner refills its pool, grown to the size of the last
    burst (six tasks at once here: more than its mix of three), and says so in /api/health."""
    def pool() -> dict:
        return api.http.get("/api/health").json()["details"]["provisioner"]

    wait_for(lambda: pool()["warm_pool_size"], timeout_s=30, what="the provisioner's pool status")
    assert pool()["warm_pool_min"] == 3 and pool()["warm_pool_max"] == 16
    with ThreadPoolExecutor(max_workers=6) as threads:
        tasks = list(threads.map(lambda n: api.submit(repo=origin.as_uri(), prompt=nonce_prompt(n), agent="shell"),
                                 [secrets.token_hex(6) for _ in range(6)]))
    for task in tasks:
        assert_flow_completes(api, task["task_id"], timeout_s=180)
    assert 6 <= pool()["warm_pool_size"] <= 16
    wait_for(lambda: pool()["warm_vm_agents"] == pool()["warm_pool_size"], timeout_s=120,
             what="the warm pool filled to its grown size in /api/health")
