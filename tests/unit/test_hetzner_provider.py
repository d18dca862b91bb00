"""Contract tests: the Hetzner provider against the fake Hetzner API, through the real hcloud client."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from types import SimpleNamespace
from decimal import Decimal

import pytest
from hcloud.images import Image
from hcloud.server_types import ServerType

from events import BaseEvent, ServerCreated, ServerDeleted, ServerRequested, VmAgentConnected
from services.provisioner.hetzner import HetznerConfig, HetznerProvider, install_id
from services.provisioner.providers import ProvisionError, WorkspaceOrder, provider_problem
from services.provisioner.reaper import Reaper
from services.runtime.settings import Settings
from tests.support.fake_hetzner import FakeHetzner

SECRET = "install-secret-for-tests"


@pytest.fixture
def token() -> str:
    return "hc-" + secrets.token_hex(16)


@pytest.fixture
def fake(token: str):
    with FakeHetzner(token=token) as api:
        yield api


class Recorded(list):
    def __call__(self, task_id: str, event: BaseEvent) -> None:
        self.append((task_id, event))

    def of(self, kind: type[BaseEvent]) -> list:
        return [event for _, event in self if isinstance(event, kind)]


def provider_on(fake: FakeHetzner, token: str, recorded: Recorded, **overrides) -> HetznerProvider:
    config = dict(token=token, endpoint=fake.endpoint, server_type="cx32", image="ubuntu-24.04",
                  locations=("fsn1", "nbg1", "hel1"), install_id=install_id(SECRET),
                  gateway_url="https://baton.example.com", nats_url="tls://nats.example.com:4222",
                  credential_ttl_s=3600.0, poll_interval_s=0.01)
    config.update(overrides)
    return HetznerProvider(HetznerConfig(**config), secret=SECRET, record=recorded,
                           calls_home=lambda workspace_id: {"BATON_VM_ID": workspace_id})


def order(task_id: str = "0123456789abcdef", attempt: int = 1) -> WorkspaceOrder:
    return WorkspaceOrder(task_id=task_id, repo="https://git.example.com/r.git", base_branch=None,
                          agent="shell", attempt=attempt)


async def test_a_server_is_created_with_labels_naming_the_install_the_task_and_the_attempt(fake, token):
    recorded = Recorded()
    placement = await provider_on(fake, token, recorded).provision(order(attempt=2))

    [server] = fake.servers()
    assert server["id"] == placement.server_id and server["status"] == "running"
    assert server["labels"] == {"baton.install": install_id(SECRET), "baton.task": "0123456789abcdef",
                                "baton.attempt": "2"}
    assert placement.vm_agent_url is None  # It calls home over the bus.
    # The handoffs are on the record, in order, and the action was polled to completion.
    assert [type(e) for _, e in recorded] == [ServerRequested, ServerCreated]
    assert recorded.of(ServerCreated)[0].location == "fsn1"
    assert ("GET", f"/v1/actions/{server['id'] + 1}", None) in fake.state.requests


async def test_a_location_without_room_passes_to_the_next(fake, token):
    fake.state.unavailable_locations = {"fsn1", "nbg1"}
    recorded = Recorded()
    await provider_on(fake, token, recorded).provision(order())

    [server] = fake.servers()
    assert server["location"]["name"] == "hel1"
    assert recorded.of(ServerCreated)[0].location == "hel1"


async def test_no_location_with_room_fails_naming_resource_unavailable(fake, token):
    fake.state.unavailable_locations = {"fsn1", "nbg1", "hel1"}
    with pytest.raises(ProvisionError, match="no cx32 available in fsn1, nbg1, hel1 .resource_unavailable."):
        await provider_on(fake, token, Recorded()).provision(order())
    assert fake.servers() == []


async def test_a_bad_token_fails_at_once_with_a_clear_reason(fake, token):
    with pytest.raises(ProvisionError) as failure:
        await provider_on(fake, "not-the-token", Recorded()).provision(order())
    assert str(failure.value) == "Hetzner refused the API token (unauthorized): check BATON_HCLOUD_TOKEN"
    assert len(fake.state.requests) == 1  # Not retried: one request, then the reason.
    assert fake.servers() == []


async def test_a_rate_limit_is_retried_with_backoff_then_the_server_is_created(fake, token):
    fake.state.rate_limited_requests = 1
    await provider_on(fake, token, Recorded()).provision(order())
    assert len(fake.servers()) == 1
    assert sum(1 for method, path, _ in fake.state.requests if path == "/v1/servers") >= 2


async def test_another_api_error_carries_the_apis_message(fake, token):
    with pytest.raises(ProvisionError, match=r"Hetzner API error \(invalid_input\): invalid input"):
        await provider_on(fake, token, Recorded(), server_type="no-such-type").provision(order())


async def test_release_deletes_the_server_and_records_its_life_and_cost_from_the_api_prices(fake, token):
    recorded, later = Recorded(), [0.0]
    provider = provider_on(fake, token, recorded)
    provider._clock = lambda: time.time() + later[0]
    placement = await provider.provision(order())
    later[0] = 2 * 3600.0  # The task ran two hours.
    await provider.release("0123456789abcdef", attempt=1, reason="task completed")

    assert fake.servers() == []
    [deleted] = recorded.of(ServerDeleted)
    assert deleted.server_id == placement.server_id and deleted.reason == "task completed"
    assert deleted.seconds == pytest.approx(7200, abs=30)
    # cx32 costs 0.0113 EUR/h net in the fake's price list: two hours, 0.0226 EUR.
    assert deleted.cost_eur == pytest.approx(0.0226, abs=0.0001)
    assert provider.hourly_price("cx32", "hel1") == Decimal("0.0113")


async def test_the_reaper_deletes_servers_no_live_task_owns_including_one_never_announced(fake, token):
    recorded = Recorded()
    provider = provider_on(fake, token, recorded)
    live = await provider.provision(order("aaaaaaaaaaaaaaaa"))
    ended = await provider.provision(order("bbbbbbbbbbbbbbbb"))
    lost_attempt = await provider.provision(order("aaaaaaaaaaaaaaaa", attempt=2))
    # A provisioner killed after its create call: the server exists, labelled, but never announced.
    orphan = provider._client.servers.create(
        name="baton-orphan", server_type=ServerType(name="cx22"),
        image=Image(name="ubuntu-24.04"),
        labels={"baton.install": install_id(SECRET), "baton.task": "cccccccccccccccc", "baton.attempt": "1"},
    ).server
    # Another install's server is not ours to delete.
    foreign = provider._client.servers.create(
        name="someone-elses", server_type=ServerType(name="cx22"),
        image=Image(name="ubuntu-24.04"), labels={"baton.install": "other"}).server

    reaper = Reaper(provider, lambda: {("aaaaaaaaaaaaaaaa", 2)}, every_s=60)
    reaped = await reaper.reap_once()

    assert {m.machine_id for m in reaped} == {live.server_id, ended.server_id, orphan.id}
    assert {s["id"] for s in fake.servers()} == {lost_attempt.server_id, foreign.id}
    assert {e.server_id for e in recorded.of(ServerDeleted)} == {live.server_id, ended.server_id, orphan.id}
    assert await reaper.reap_once() == []


async def test_the_token_is_in_no_event_log_line_or_user_data(fake, token, caplog):
    caplog.set_level(logging.DEBUG)
    recorded = Recorded()
    provider = provider_on(fake, token, recorded)
    placement = await provider.provision(order())
    await provider.release("0123456789abcdef", attempt=1, reason="done")
    with pytest.raises(ProvisionError):
        await provider_on(fake, token + "x", recorded).provision(order())

    user_data = fake.user_data_of(placement.server_id)
    assert user_data and "curl" in user_data  # the boot script was there to search
    assert token not in user_data
    assert token not in caplog.text
    assert all(token not in json.dumps(event.model_dump()) for _, event in recorded)
    assert token not in repr(provider.config)


def test_a_provider_must_be_known_and_configured_to_be_chosen(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert provider_problem("local", settings) is None
    assert "unknown provider 'aws'" in provider_problem("aws", settings)
    assert "set BATON_HCLOUD_TOKEN, BATON_VM_NATS_URL, BATON_VM_GATEWAY_URL" in provider_problem("hetzner", settings)
    configured = Settings(data_dir=tmp_path, hcloud_token="t", vm_nats_url="tls://n:4222",
                          vm_gateway_url="https://g")
    assert provider_problem("hetzner", configured) is None


def test_the_reaper_counts_as_live_only_unended_latest_attempts_on_its_provider():
    from services.provisioner.domain import Workspace
    from services.provisioner.reaper import live_attempts_in
    from tests.unit.fakes import popo_store

    store = popo_store()
    running = Workspace("a" * 16, "file:///r", None, "hetzner", "cause")
    relaunched = Workspace("b" * 16, "file:///r", None, "hetzner", "cause")
    relaunched.new_attempt(2, None, "lost")
    failed = Workspace("c" * 16, "file:///r", None, "hetzner", "cause")
    failed.failed("no room")
    released = Workspace("d" * 16, "file:///r", None, "hetzner", "cause")
    released.release("done")
    local = Workspace("e" * 16, "file:///r", None, "local", "cause")
    store.save(running, relaunched, failed, released, local)

    assert live_attempts_in(store, "hetzner")() == {("a" * 16, 1), ("b" * 16, 2)}


def test_hetzner_is_offered_only_where_it_is_configured(tmp_path, fake, token):
    from services.provisioner.providers import providers_for

    local = object()  # LocalProvider is only wrapped here, not called
    bare = providers_for(Settings(data_dir=tmp_path), local, Recorded(), calls_home=lambda ws: {})
    assert sorted(bare) == ["local"]
    configured = Settings(data_dir=tmp_path, hcloud_token=token, hcloud_endpoint=fake.endpoint,
                          vm_nats_url="tls://n:4222", vm_gateway_url="https://g", secret=SECRET)
    both = providers_for(configured, local, Recorded(), calls_home=lambda ws: {})
    assert sorted(both) == ["hetzner", "local"]
    assert both["hetzner"].config.install_id == install_id(SECRET)


async def test_an_unreachable_api_fails_with_a_reason_naming_it(token):
    from tests.support.processes import free_port

    endpoint = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(ProvisionError, match=f"could not reach the Hetzner API at {endpoint}"):
        await provider_on(SimpleNamespace(endpoint=endpoint), token, Recorded()).provision(order())


async def test_the_install_s_servers_are_listed_across_pages(fake, token):
    provider = provider_on(fake, token, Recorded())
    for n in range(60):  # more than one page of 50
        provider._client.servers.create(
            name=f"s{n}", server_type=ServerType(name="cx22"), image=Image(name="ubuntu-24.04"),
            labels={"baton.install": install_id(SECRET), "baton.task": f"{n:016x}", "baton.attempt": "1"})

    owned = await provider.owned_machines()

    assert len(owned) == 60 and {m.task_id for m in owned} == {f"{n:016x}" for n in range(60)}
    # Two pages, as the API's meta.pagination said (next_page 2, then none).
    assert sum(1 for method, path, _ in fake.state.requests if (method, path) == ("GET", "/v1/servers")) == 2


async def test_a_server_whose_vm_agent_calls_home_is_on_the_record_as_connected(fake, token):
    recorded, hellos = Recorded(), {}
    provider = provider_on(fake, token, recorded)
    provider._expect_hello = lambda vm_id: hellos.setdefault(vm_id, asyncio.get_running_loop().create_future())
    provisioning = asyncio.create_task(provider.provision(order()))
    # The hello is awaited from before the create call on; the vm_agent says it once booted.
    await asyncio.wait_for(_until(lambda: fake.servers() and "hetzner-0123456789abcdef" in hellos), 30)
    hellos["hetzner-0123456789abcdef"].set_result({"vm_id": "hetzner-0123456789abcdef"})
    await asyncio.wait_for(provisioning, 30)

    assert [type(e) for _, e in recorded] == [ServerRequested, ServerCreated, VmAgentConnected]
    assert recorded.of(VmAgentConnected)[0].workspace_id == "hetzner-0123456789abcdef"


async def test_a_server_whose_vm_agent_never_calls_home_is_deleted_and_the_gap_named(fake, token):
    recorded = Recorded()
    provider = provider_on(fake, token, recorded, call_home_timeout_s=0.5)
    provider._expect_hello = lambda vm_id: asyncio.get_running_loop().create_future()  # never said

    with pytest.raises(ProvisionError, match=r"the vm_agent of hetzner-0123456789abcdef did not call home "
                                             r"within 0.5 s \(VmAgentConnected missing after ServerCreated\); "
                                             r"its server \d+ was deleted"):
        await provider.provision(order())
    assert fake.servers() == []
    assert "did not call home" in recorded.of(ServerDeleted)[0].reason


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.02)
