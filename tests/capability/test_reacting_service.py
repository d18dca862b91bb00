"""A service outside Baton reacts to its events with a read-only credential of its own.

Driven as its operator would: `baton credentials` issues and revokes, the example service in
examples/ runs as its own process, and the bus is the stack's real, authenticated NATS.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js import JetStreamContext

from events import STREAM, Envelope, TaskCompleted
from events.client import reader_inbox, subscribe
from services.runtime.nats_auth import InstallAuth, decode_claims
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.processes import BatonStack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

REPO_ROOT = Path(__file__).resolve().parents[2]


def baton(stack: BatonStack, *args: str, nats_url_given: bool = True) -> subprocess.CompletedProcess:
    """`baton ARGS` on the stack's data dir, told its NATS URL (BATON_NATS_URL) unless not `nats_url_given`."""
    env = {**{k: v for k, v in os.environ.items() if k != "BATON_NATS_URL"},
           "BATON_DATA_DIR": str(stack.data_dir), "COLUMNS": "200",
           **({"BATON_NATS_URL": stack.nats_url} if nats_url_given else {})}
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


def issue(stack: BatonStack, tmp_path: Path, name: str) -> Path:
    """A read-only credential named `name`, as its operator issues it; its .creds path."""
    creds = tmp_path / f"{name}.creds"
    done = baton(stack, "credentials", "create", "--name", name, "--read-only", "--out", str(creds))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"reader-{name}" in done.stdout
    return creds


@pytest.fixture
def reader_name() -> str:
    return f"svc{secrets.token_hex(4)}"


async def first_event(stack: BatonStack, creds: Path, durable: str) -> Envelope:
    async def read() -> Envelope:
        async for received in subscribe(stack.nats_url, creds, durable):
            return received.envelope
        raise AssertionError("the stream ended")

    return await asyncio.wait_for(read(), timeout=30)


async def refused(attempt) -> bool:  # noqa: ANN001 - an awaitable
    """True if the server never let the request through: a permissions violation leaves it
    unanswered (a JetStream error, e.g. "not found", would mean it got through)."""
    try:
        await attempt
    except (nats.errors.TimeoutError, asyncio.TimeoutError):
        return True
    return False


def test_a_read_only_credential_consumes_and_cannot_publish_or_delete_anything(
        stack: BatonStack, api: Api, origin: Path, tmp_path: Path, reader_name: str):
    task_id = api.submit(repo=origin.as_uri(), prompt="echo read > read.txt", agent="shell")["task_id"]
    assert_flow_completes(api, task_id, timeout_s=120)
    creds = issue(stack, tmp_path, reader_name)
    durable = f"reader-{reader_name}"

    async def scenario() -> None:
        # It reads the stream from the start through its own consumer.
        assert (await first_event(stack, creds, durable)).type == "TaskSubmitted"
        nc = await nats.connect(stack.nats_url, user_credentials=str(creds), inbox_prefix=reader_inbox(durable),
                                allow_reconnect=False)
        js = nc.jetstream(timeout=2)
        try:
            forged = Envelope(type="TaskCompleted", task_id=task_id, actor="service:task-runner",
                              data=TaskCompleted(branch="evil", commit="0" * 40).model_dump(mode="json"))
            assert await refused(js.publish(forged.subject, forged.to_json(), stream=STREAM))
            assert await refused(js.delete_stream(STREAM))
            assert await refused(js.purge_stream(STREAM))
            assert await refused(js.delete_msg(STREAM, 1))
            assert await refused(js.delete_consumer(STREAM, durable))
            # Its own consumer it may look at; another reader's it may not.
            assert not await refused(js.consumer_info(STREAM, durable))
            assert await refused(js.consumer_info(STREAM, f"reader-not-{reader_name}"))
        finally:
            await nc.close()

    asyncio.run(scenario())
    # Nothing it tried happened: the history and the task are as they were.
    events = api.events(task_id)
    assert [e["type"] for e in events].count("TaskCompleted") == 1
    assert all(e["data"].get("branch") != "evil" for e in events)


def test_a_reader_goes_on_past_a_fetch_that_times_out_with_a_bare_timeout_error(
        stack: BatonStack, api: Api, origin: Path, tmp_path: Path, reader_name: str,
        monkeypatch: pytest.MonkeyPatch):
    # nats-py's fetch raises a bare asyncio.TimeoutError, not its own, when its deadline runs out
    # between its two pull requests (seen under load in CI); for a reader that is "nothing yet".
    fetch = JetStreamContext.PullSubscription.fetch
    timed_out: list[int] = []

    async def first_times_out(self, *args, **kwargs):  # noqa: ANN001, ANN202 - fetch's own signature
        if not timed_out:
            timed_out.append(1)
            raise asyncio.TimeoutError
        return await fetch(self, *args, **kwargs)

    monkeypatch.setattr(JetStreamContext.PullSubscription, "fetch", first_times_out)
    task_id = api.submit(repo=origin.as_uri(), prompt="echo late > late.txt", agent="shell")["task_id"]
    assert_flow_completes(api, task_id, timeout_s=120)
    creds = issue(stack, tmp_path, reader_name)

    assert asyncio.run(first_event(stack, creds, f"reader-{reader_name}")).type == "TaskSubmitted"
    assert timed_out


def test_a_revoked_credential_is_refused_at_once(stack: BatonStack, tmp_path: Path, reader_name: str):
    creds = issue(stack, tmp_path, reader_name)
    durable = f"reader-{reader_name}"

    async def connected() -> nats.NATS:
        return await nats.connect(stack.nats_url, user_credentials=str(creds), inbox_prefix=reader_inbox(durable),
                                  allow_reconnect=False, max_reconnect_attempts=0)

    async def scenario() -> None:
        open_connection = await connected()
        # No --nats-url, no BATON_NATS_URL: revoke finds the NATS the running `baton up` was given.
        done = baton(stack, "credentials", "revoke", reader_name, nats_url_given=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"NATS at {stack.nats_url} refuses it" in done.stdout
        # The server closes the connection it held, and refuses a new one.
        await asyncio.wait_for(_closed(open_connection), timeout=10)
        with pytest.raises(nats.errors.Error, match="Authorization Violation|[Rr]evoked"):
            await connected()

    asyncio.run(scenario())
    # The revocation outlives the server: the configuration every later start writes carries it.
    revoked_key = decode_claims(creds.read_text().split("\n")[1])["sub"]
    account_jwt = InstallAuth(stack.data_dir / "nats-auth").account_jwt()
    assert revoked_key in decode_claims(account_jwt)["nats"]["revocations"]
    listed = baton(stack, "credentials", "list").stdout
    line = next(row for row in listed.splitlines() if reader_name in row)
    assert line.rstrip(" │").split("│")[-1].strip() not in ("", "-"), listed


def test_baton_up_keeps_the_url_of_the_nats_it_runs_private_while_it_runs(tmp_path: Path):
    stack = BatonStack(nats=None, data_dir=tmp_path / "baton").start()
    kept = tmp_path / "baton" / "run" / "nats.url"
    try:
        assert kept.read_text() == stack.nats_url
        assert kept.stat().st_mode & 0o777 == 0o600
    finally:
        stack.stop()
    assert not kept.exists()


async def _closed(nc: nats.NATS) -> None:
    while not nc.is_closed:
        await asyncio.sleep(0.05)


class Reactor:
    """The example service (examples/react_to_completed_tasks.py) as its operator runs it."""

    def __init__(self, stack: BatonStack, creds: Path, durable: str, out: Path) -> None:
        self.command = [sys.executable, "examples/react_to_completed_tasks.py", "--nats-url", stack.nats_url,
                        "--creds", str(creds), "--durable", durable, "--out", str(out)]
        self.out = out
        self.processes: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        self.processes.append(subprocess.Popen(self.command, cwd=REPO_ROOT,
                                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}))
        return self.processes[-1]

    def posted(self) -> list[str]:
        """The task ids it posted a branch for, in order (one per TaskCompleted it handled)."""
        lines = self.out.read_text().splitlines() if self.out.exists() else []
        return [json.loads(line)["task_id"] for line in lines]

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)


@pytest.fixture
def reactor(stack: BatonStack, tmp_path: Path, reader_name: str) -> Iterator[Reactor]:
    reactor = Reactor(stack, issue(stack, tmp_path, reader_name), f"reader-{reader_name}",
                      tmp_path / "completed.jsonl")
    try:
        yield reactor
    finally:
        reactor.kill_all()


def test_the_example_reactor_sees_each_task_completed_once_across_its_restart(
        api: Api, origin: Path, reactor: Reactor):
    process = reactor.start()
    first = api.submit(repo=origin.as_uri(), prompt="echo one > one.txt", agent="shell")["task_id"]
    assert_flow_completes(api, first, timeout_s=120)
    wait_for(lambda: first in reactor.posted(), timeout_s=60, what="the reactor to post the first task's branch")

    # Stopped as an operator stops it, while a task completes…
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    second = api.submit(repo=origin.as_uri(), prompt="echo two > two.txt", agent="shell")["task_id"]
    assert_flow_completes(api, second, timeout_s=120)

    # …and once started again it goes on from where it stopped: the second task, never the first again.
    reactor.start()
    wait_for(lambda: second in reactor.posted(), timeout_s=60, what="the restarted reactor to post the second task")
    assert reactor.posted().count(first) == 1 and reactor.posted().count(second) == 1
    with reactor.out.open() as lines:
        branch = next(json.loads(line) for line in lines if second in line)["branch"]
    assert branch == f"baton/{second}"
