"""The bus `baton up` starts takes no anonymous client, and each credential says only what its holder may.

Driven as an attacker on the same machine would: straight at the NATS port `baton up` printed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nats
import nats.errors
import pytest

from events import STREAM, Envelope, WorkspaceReady
from events.catalog import envelope_for
from services.runtime.nats_auth import (
    InstallAuth, Permissions, raw_credentials, vm_agent_inbox, vm_agent_permissions,
)
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import make_origin
from tests.support.processes import BatonStack, NatsServer, stop_soon

pytestmark = pytest.mark.capability


@pytest.fixture(scope="module")
def own_bus_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    """`baton up` with the NATS it starts itself (no --nats-url)."""
    stack = BatonStack(nats=None, data_dir=tmp_path_factory.mktemp("own-bus") / "baton")
    try:
        yield stack.start()
    finally:
        stop_soon(stack, None)


class Recorder(BaseHTTPRequestHandler):
    """A server standing in for wherever a forged WorkspaceReady would send the task runner."""

    contacted: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        Recorder.contacted.append(self.path)
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def trap() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Recorder.contacted = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


async def connect(url: str, **options: object) -> nats.NATS:
    errors: list[Exception] = []

    async def remember(error: Exception) -> None:
        errors.append(error)

    nc = await nats.connect(url, allow_reconnect=False, error_cb=remember, **options)
    nc.seen_errors = errors  # type: ignore[attr-defined]
    return nc


async def publish_refused(nc: nats.NATS, envelope: Envelope) -> bool:
    """True if JetStream never stored it (the server refused the publish)."""
    try:
        await nc.jetstream().publish(envelope.subject, envelope.to_json(), stream=STREAM, timeout=2)
    except (nats.errors.TimeoutError, TimeoutError):
        await asyncio.sleep(0)  # Let the -ERR reach the error callback.
        return True
    return False


def test_an_anonymous_client_is_refused_by_baton_up_s_nats(own_bus_stack: BatonStack):
    async def scenario() -> None:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(own_bus_stack.nats_url, allow_reconnect=False, max_reconnect_attempts=0)

    asyncio.run(scenario())
    # And the stack says its bus is authenticated.
    health = Api(own_bus_stack.api, own_bus_stack.token).http.get("/api/health").json()
    assert health["bus"] == "authenticated"
    assert "THE BUS IS OPEN" not in health.get("warning", "")


def test_a_vm_agent_credential_cannot_speak_for_another_task(own_bus_stack: BatonStack, trap: str):
    api = Api(own_bus_stack.api, own_bus_stack.token)
    origin = make_origin(own_bus_stack.data_dir.parent)
    victim = api.submit(repo=origin.as_uri(), prompt="echo victim", agent="shell")["task_id"]
    # A credential exactly like the one the provisioner hands the vm_agent of task `mine`.
    mine = secrets.token_hex(8)
    creds = InstallAuth(own_bus_stack.data_dir / "nats-auth").user_creds(
        f"vm_agent-{mine}", vm_agent_permissions(mine), ttl_s=600)

    async def scenario() -> None:
        nc = await connect(own_bus_stack.nats_url, user_credentials=raw_credentials(creds),
                           inbox_prefix=vm_agent_inbox(mine))
        try:
            forged_end = Envelope(type="TaskCompleted", task_id=victim, actor="service:task-runner",
                                  data={"branch": "baton/x", "commit": "0" * 40})
            forged_ready = envelope_for(
                WorkspaceReady(workspace_id="evil", provider="local", vm_agent_url=trap),
                task_id=victim, actor="service:provisioner")
            assert await publish_refused(nc, forged_end)
            assert await publish_refused(nc, forged_ready)
            assert any("permissions violation" in str(e).lower() for e in nc.seen_errors), nc.seen_errors
        finally:
            await nc.close()

    asyncio.run(scenario())
    # The victim task runs its own course, and the forged URL was never contacted.
    events = assert_flow_completes(api, victim, timeout_s=120)
    assert [e["type"] for e in events].count("TaskCompleted") == 1
    assert [e for e in events if e["type"] == "WorkspaceReady"][0]["data"]["vm_agent_url"] != trap
    assert Recorder.contacted == []


def test_an_envelope_about_another_task_on_a_vm_agent_s_own_subject_changes_nothing(own_bus_stack: BatonStack):
    api = Api(own_bus_stack.api, own_bus_stack.token)
    origin = make_origin(own_bus_stack.data_dir.parent / "forged-inside")
    victim = api.submit(repo=origin.as_uri(), prompt="sleep 1; echo victim", agent="shell")["task_id"]
    mine = secrets.token_hex(8)
    creds = InstallAuth(own_bus_stack.data_dir / "nats-auth").user_creds(
        f"vm_agent-{mine}", vm_agent_permissions(mine), ttl_s=600)

    async def scenario() -> None:
        nc = await connect(own_bus_stack.nats_url, user_credentials=raw_credentials(creds),
                           inbox_prefix=vm_agent_inbox(mine))
        try:
            # Published where this credential may publish (its own task's AgentOutput), but the
            # envelope inside claims to end the victim's session.
            forged = Envelope(type="SessionFailed", task_id=victim, actor="vm_agent", data={"reason": "PWNED"})
            ack = await nc.jetstream().publish(f"baton.task.{mine}.AgentOutput", forged.to_json(), stream=STREAM)
            assert ack.seq > 0
        finally:
            await nc.close()

    asyncio.run(scenario())
    # The victim runs its own course: the forged envelope is never acted on…
    events = assert_flow_completes(api, victim, timeout_s=120)
    assert all(e["data"].get("reason") != "PWNED" for e in events)
    assert api.task(victim)["state"] == "completed"
    # …and the audit trail names it as misrouted.
    gateway = api.http.get("/api/health").json()
    assert gateway["dead_letters"] >= 1


def test_every_credential_is_confined(own_bus_stack: BatonStack):
    auth = InstallAuth(own_bus_stack.data_dir / "nats-auth")
    task = secrets.token_hex(8)

    async def scenario() -> None:
        # A vm_agent may publish its own task's output, and nothing reaches the JetStream API.
        vm = await connect(own_bus_stack.nats_url, inbox_prefix=vm_agent_inbox(task),
                           user_credentials=raw_credentials(
                               auth.user_creds(f"vm_agent-{task}", vm_agent_permissions(task), ttl_s=600)))
        try:
            own = Envelope(type="AgentOutput", task_id=task, actor="vm_agent",
                           data={"seq": 1, "stream": "stdout", "text": "mine"})
            assert not await publish_refused(vm, own)
            with pytest.raises((nats.errors.TimeoutError, TimeoutError, nats.errors.Error)):
                await vm.jetstream().delete_stream(STREAM)
        finally:
            await vm.close()
        # A service may not publish another service's events nor delete the history.
        gateway = await connect(own_bus_stack.nats_url,
                                user_credentials=own_bus_stack.nats_credentials("gateway"))
        try:
            forged = Envelope(type="TaskFailed", task_id=task, actor="service:task-runner",
                              data={"reason": "forged"})
            assert await publish_refused(gateway, forged)
            with pytest.raises((nats.errors.TimeoutError, TimeoutError, nats.errors.Error)):
                await gateway.jetstream().delete_stream(STREAM)
            assert (await gateway.jetstream().stream_info(STREAM)).config.name == STREAM
        finally:
            await gateway.close()

    asyncio.run(scenario())


def test_an_expired_vm_agent_credential_is_refused(own_bus_stack: BatonStack):
    task = secrets.token_hex(8)
    creds = InstallAuth(own_bus_stack.data_dir / "nats-auth").user_creds(
        f"vm_agent-{task}", vm_agent_permissions(task), ttl_s=-60)

    async def scenario() -> None:
        with pytest.raises(nats.errors.Error):
            await nats.connect(own_bus_stack.nats_url, allow_reconnect=False, max_reconnect_attempts=0,
                               user_credentials=raw_credentials(creds))

    asyncio.run(scenario())


def test_stores_and_secrets_are_private(own_bus_stack: BatonStack):
    data_dir: Path = own_bus_stack.data_dir
    assert data_dir.stat().st_mode & 0o777 == 0o700
    for path in [data_dir / "secret", data_dir / "api-token", *(data_dir / "nats-auth").glob("*.nk"),
                 *(data_dir / "stores").glob("*"), *(data_dir / "logs").glob("*.log")]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"


def test_an_open_nats_url_is_called_out_loudly_by_baton_up_and_health(tmp_path: Path):
    """`--nats-url` of a NATS that lets anyone in (no credentials configured): Baton still runs, and
    says so where the operator looks."""
    open_nats = NatsServer(store_dir=tmp_path / "nats").start()
    stack = BatonStack(nats=open_nats, data_dir=tmp_path / "baton")
    try:
        stack.start()
        health = Api(stack.api, stack.token).http.get("/api/health").json()
        assert health["bus"] == "open", health
        assert "THE BUS IS OPEN" in health["warning"], health
        assert "THE BUS IS OPEN" in stack.log_path.read_text()
        # Without the token, health still says only up or down.
        assert Api(stack.api, "not-the-token").http.get("/api/health").json().keys() == {"status"}
    finally:
        stop_soon(stack, open_nats)


def test_a_nats_creds_file_runs_a_task_and_its_secrets_are_nowhere(tmp_path: Path, origin: Path):
    """`--nats-url` to a NATS that only lets in users of its own operator, and BATON_NATS_CREDS (a
    `.creds` file its operator issued): every service and the vm_agent get in with it, a task
    completes, the bus is not called open, and neither the file's JWT nor its seed is in an event,
    a log or a file of the install."""
    operator = InstallAuth(tmp_path / "their-nats" / "nats-auth")
    creds_text = operator.user_creds("baton", Permissions(publish=(">",), subscribe=(">",)))
    creds = tmp_path / "baton.creds"
    creds.write_text(creds_text)
    creds.chmod(0o600)
    jwt, seed = (line.strip() for line in creds_text.splitlines() if line.startswith(("eyJ", "SU")))
    nats = NatsServer(store_dir=tmp_path / "nats", trusting=tmp_path / "their-nats").start()
    stack = BatonStack(nats=nats, data_dir=tmp_path / "baton", extra_env={"BATON_NATS_CREDS": str(creds)})
    try:
        events, health = a_task_through_the_configured_bus(stack, origin)
        for secret in (jwt, seed):
            assert secret not in json.dumps(events) and secret not in json.dumps(health)
            assert files_holding(stack.data_dir, secret) == []
    finally:
        stop_soon(stack, nats)


def a_task_through_the_configured_bus(stack: BatonStack, origin: Path) -> tuple[list[dict], dict]:
    """Start `stack` on a bus whose credentials are configured, see it is not called open, and
    run a task to completion: its events and the health the gateway answered."""
    stack.start()
    api = Api(stack.api, stack.token)
    health = api.http.get("/api/health").json()
    assert health["bus"] != "open" and "THE BUS IS OPEN" not in json.dumps(health), health
    task_id = api.submit(repo=origin.as_uri(), prompt="echo hi > hi.txt", agent="shell")["task_id"]
    events = assert_flow_completes(api, task_id, timeout_s=120)
    said = stack.log_path.read_text()
    assert "bus: authenticated with the credentials configured" in said, said
    return events, health


def files_holding(data_dir: Path, secret: str, *, but: tuple[Path, ...] = ()) -> list[Path]:
    return [path for path in data_dir.rglob("*")
            if path.is_file() and path not in but and secret.encode() in path.read_bytes()]


def test_a_nats_url_with_a_token_runs_a_task_and_the_token_is_nowhere(tmp_path: Path, origin: Path):
    """`--nats-url nats://TOKEN@host` (credentials given by configuration): every service and the
    task's vm_agent get in with it, a task completes, the bus is not called open, and the token is
    in no event, log or file of the install."""
    token = f"nats-token-{secrets.token_hex(12)}"
    nats = NatsServer(store_dir=tmp_path / "nats", token=token).start()
    stack = BatonStack(nats=nats, data_dir=tmp_path / "baton")
    try:
        events, health = a_task_through_the_configured_bus(stack, origin)
        assert token not in json.dumps(events) and token not in json.dumps(health)
        said = stack.log_path.read_text()
        assert token not in said and "nats: nats://***@127.0.0.1" in said, said
        # Only where `baton audit` and `baton credentials` find the running bus (owner-only).
        url_file = stack.data_dir / "run" / "nats.url"
        assert url_file.stat().st_mode & 0o777 == 0o600
        assert files_holding(stack.data_dir, token, but=(url_file,)) == []
    finally:
        stop_soon(stack, nats)
