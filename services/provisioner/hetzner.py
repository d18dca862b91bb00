"""The Hetzner provider: a server per task attempt through the `hcloud` client, booted by cloud-init.

Every server is labelled before it exists (install, task, attempt), so the reaper finds one that a
provisioner killed mid-creation left behind. `hcloud` calls block: each runs in a worker thread
(`asyncio.to_thread`), never on the event loop. The API token stays in the client: it is never in
an event, a log line or a server's user_data.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal

import requests
from hcloud import APIException, Client
from hcloud.actions import ActionException
from hcloud.images import Image
from hcloud.locations import Location
from hcloud.server_types import ServerType
from hcloud.servers import BoundServer

from events import ServerCreated, ServerDeleted, ServerRequested, VmAgentConnected
from services.provisioner.cloud_init import Artifact, BootPlan, build_user_data, dist_credential, vm_agent_artifact
from services.provisioner.providers import OwnedMachine, Placement, ProvisionError, RecordEvent, WorkspaceOrder
from services.runtime.settings import Settings

log = logging.getLogger(__name__)

INSTALL_LABEL, TASK_LABEL, ATTEMPT_LABEL = "baton.install", "baton.task", "baton.attempt"


@dataclass(frozen=True)
class HetznerConfig:
    """Where and what to create; `token` only ever goes to the hcloud client."""

    token: str = field(repr=False)
    endpoint: str
    server_type: str
    image: str
    locations: tuple[str, ...]
    install_id: str
    gateway_url: str
    nats_url: str
    credential_ttl_s: float
    poll_interval_s: float = 1.0
    call_home_timeout_s: float = 600.0
    """A server whose vm_agent has not said hello this long after ServerCreated is deleted."""

    @classmethod
    def from_settings(cls, settings: Settings) -> HetznerConfig:
        if not (settings.hcloud_token and settings.vm_gateway_url and settings.vm_nats_url):
            raise ValueError("hetzner needs BATON_HCLOUD_TOKEN, BATON_VM_GATEWAY_URL and BATON_VM_NATS_URL")
        return cls(token=settings.hcloud_token, endpoint=settings.hcloud_endpoint,
                   server_type=settings.hcloud_server_type, image=settings.hcloud_image,
                   locations=settings.hcloud_locations, install_id=install_id(settings.install_secret()),
                   gateway_url=settings.vm_gateway_url, nats_url=settings.vm_nats_url,
                   credential_ttl_s=settings.vm_agent_credential_ttl_s,
                   call_home_timeout_s=settings.vm_call_home_timeout_s)


def install_id(secret: str) -> str:
    """This install's name on its servers' labels: derived from, never revealing, its secret."""
    return hashlib.sha256(b"baton install id/" + secret.encode()).hexdigest()[:16]


def workspace_id_of(task_id: str, attempt: int) -> str:
    return f"hetzner-{task_id}" + (f"-a{attempt}" if attempt > 1 else "")


class HetznerProvider:
    """Servers on Hetzner Cloud, one per task attempt (see the module docstring)."""

    name = "hetzner"

    def __init__(self, config: HetznerConfig, *, secret: str, record: RecordEvent,
                 calls_home: Callable[[str], dict[str, str]] = lambda workspace_id: {},
                 expect_hello: Callable[[str], Awaitable[object]] | None = None,
                 clock: Callable[[], float] = time.time,
                 artifact: Callable[[], Artifact] = vm_agent_artifact) -> None:
        """`calls_home(workspace_id)`: the vm_agent's environment in the user_data (its identity and
        member credential). `expect_hello(vm_id)`: resolves when that vm_agent says hello on the bus
        (MemberBus.expect_hello); None: provision returns once the server runs."""
        self.config = config
        self._expect_hello = expect_hello
        self._secret = secret
        self._record = record
        self._calls_home = calls_home
        self._clock = clock
        self._artifact = artifact  # The vm_agent a VM boots (the one the gateway serves: cloud_init.pinned_artifact).
        self._client = Client(token=config.token, api_endpoint=config.endpoint, poll_interval=config.poll_interval_s,
                              application_name="baton")
        self._prices: dict[tuple[str, str], Decimal] = {}

    async def provision(self, order: WorkspaceOrder) -> Placement:
        """A running server for the order whose vm_agent called home over the bus (VmAgentConnected).
        One that does not within `call_home_timeout_s` is deleted, and the reason names the gap."""
        workspace_id = workspace_id_of(order.task_id, order.attempt)
        # Listening before the server exists: its hello cannot come before we wait for it.
        hello = self._expect_hello(workspace_id) if self._expect_hello else None
        placement = await asyncio.to_thread(self._provision, order)
        if hello is not None:
            await self._wait_for_call_home(order, placement, hello)
        return placement

    async def _wait_for_call_home(self, order: WorkspaceOrder, placement: Placement, hello: Awaitable[object]) -> None:
        timeout_s = self.config.call_home_timeout_s
        try:
            await asyncio.wait_for(hello, timeout=timeout_s)
        except asyncio.TimeoutError:
            reason = (f"the vm_agent of {placement.workspace_id} did not call home within {timeout_s:g} s "
                      f"(VmAgentConnected missing after ServerCreated)")
            await self.release(order.task_id, attempt=order.attempt, reason=reason)
            raise ProvisionError(f"{reason}; its server {placement.server_id} was deleted") from None
        self._record(order.task_id, VmAgentConnected(workspace_id=placement.workspace_id,
                                                     version=self._artifact().version, attempt=order.attempt))

    async def release(self, task_id: str, *, attempt: int, reason: str) -> None:
        """Delete the attempt's server(s), recording each one's life and cost."""
        selector = f"{self._install_selector()},{TASK_LABEL}={task_id},{ATTEMPT_LABEL}={attempt}"
        for server in await asyncio.to_thread(self._call, self._client.servers.get_all, label_selector=selector):
            await asyncio.to_thread(self._delete, server, reason)

    async def owned_machines(self) -> list[OwnedMachine]:
        servers = await asyncio.to_thread(self._call, self._client.servers.get_all,
                                          label_selector=self._install_selector())
        return [_owned(server) for server in servers]

    async def delete_machine(self, machine: OwnedMachine, *, reason: str) -> None:
        server = await asyncio.to_thread(self._call, self._client.servers.get_by_id, machine.machine_id)
        await asyncio.to_thread(self._delete, server, reason)

    def _install_selector(self) -> str:
        return f"{INSTALL_LABEL}={self.config.install_id}"

    def _provision(self, order: WorkspaceOrder) -> Placement:
        workspace_id = workspace_id_of(order.task_id, order.attempt)
        name = f"baton-{workspace_id}"
        for leftover in self._call(self._client.servers.get_all, name=name):  # an interrupted creation
            self._delete(leftover, "left by an interrupted creation; replaced")
        expires_at = self._clock() + self.config.credential_ttl_s
        user_data = build_user_data(self._boot_plan(workspace_id, expires_at))
        self._record(order.task_id, ServerRequested(
            provider=self.name, name=name, server_type=self.config.server_type,
            locations=self.config.locations, attempt=order.attempt))
        server = self._create_in_first_location_with_room(order, name, user_data)
        self._record(order.task_id, ServerCreated(
            provider=self.name, server_id=server.id, server_type=self.config.server_type,
            location=server.location.name, attempt=order.attempt))
        return Placement(workspace_id=workspace_id, vm_agent_url=None, credential_expires_at=expires_at,
                         server_id=server.id)

    def _boot_plan(self, workspace_id: str, expires_at: float) -> BootPlan:
        return BootPlan(workspace_id=workspace_id, gateway_url=self.config.gateway_url,
                        version=self._artifact().version,
                        dist_credential=dist_credential(self._secret, workspace_id, expires_at),
                        nats_url=self.config.nats_url, vm_agent_env=self._calls_home(workspace_id))

    def _create_in_first_location_with_room(self, order: WorkspaceOrder, name: str, user_data: str) -> BoundServer:
        full: list[str] = []
        for location in self.config.locations:
            try:
                created = self._client.servers.create(
                    name=name, server_type=ServerType(name=self.config.server_type),
                    image=Image(name=self.config.image), location=Location(name=location),
                    labels=self._labels(order), user_data=user_data)
            except requests.RequestException as error:
                raise ProvisionError(unreachable(self.config.endpoint, error)) from None
            except APIException as error:
                if error.code != "resource_unavailable":
                    raise ProvisionError(reason_of(error)) from None
                log.info("hetzner: %s unavailable in %s; trying the next location", self.config.server_type, location)
                full.append(location)
                continue
            return self._started(created.server, created.action)
        raise ProvisionError(f"Hetzner has no {self.config.server_type} available in {', '.join(full)} "
                             "(resource_unavailable): try other BATON_HCLOUD_LOCATIONS or server type")

    def _started(self, server: BoundServer, action) -> BoundServer:  # noqa: ANN001 - hcloud's BoundAction
        """The server once its create action finished; deleted (and a ProvisionError) if it failed."""
        try:
            action.wait_until_finished()
        except (ActionException, APIException, requests.RequestException) as error:
            self._delete(server, f"its creation failed: {error}")
            raise ProvisionError(f"Hetzner could not create server {server.id}: {error}") from None
        return self._call(self._client.servers.get_by_id, server.id)

    def _labels(self, order: WorkspaceOrder) -> dict[str, str]:
        return {INSTALL_LABEL: self.config.install_id, TASK_LABEL: order.task_id, ATTEMPT_LABEL: str(order.attempt)}

    def _delete(self, server: BoundServer, reason: str) -> None:
        """Delete `server` (gone already: fine) and record ServerDeleted with its life and cost."""
        try:
            self._client.servers.delete(server).wait_until_finished()
        except APIException as error:
            if error.code != "not_found":
                raise ProvisionError(reason_of(error)) from None
        owned = _owned(server)
        seconds = max(0.0, self._clock() - owned.created_at) if owned.created_at else 0.0
        cost = self._cost_eur(server, seconds)
        log.info("hetzner: deleted server %s after %.0f s (%s)", server.id, seconds, reason)
        if owned.task_id is not None:
            self._record(owned.task_id, ServerDeleted(provider=self.name, server_id=server.id, reason=reason,
                                                      seconds=round(seconds, 3), cost_eur=cost,
                                                      attempt=owned.attempt or 1))

    def _cost_eur(self, server: BoundServer, seconds: float) -> float | None:
        """The server type's hourly net price in its location (the API's prices) times its life."""
        try:
            hourly = self.hourly_price(server.server_type.name, server.location.name)
        except (ProvisionError, AttributeError, KeyError):
            return None
        return float(round(hourly * Decimal(seconds) / Decimal(3600), 6))

    def hourly_price(self, server_type: str, location: str) -> Decimal:
        """EUR per hour (net) of `server_type` in `location`, from GET /server_types (cached)."""
        if (server_type, location) not in self._prices:
            bound = self._call(self._client.server_types.get_by_name, server_type)
            for price in bound.prices or []:
                self._prices[(server_type, price["location"])] = Decimal(price["price_hourly"]["net"])
        return self._prices[(server_type, location)]

    def _call(self, method: Callable, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        """One hcloud call (it retries rate limits and conflicts with backoff itself); an API error
        becomes a ProvisionError carrying the API's reason."""
        try:
            return method(*args, **kwargs)
        except APIException as error:
            raise ProvisionError(reason_of(error)) from None
        except requests.RequestException as error:
            raise ProvisionError(unreachable(self.config.endpoint, error)) from None


def reason_of(error: APIException) -> str:
    """What users read for a Hetzner API error: a bad token says so at once; others, the API's words."""
    if error.code in ("unauthorized", 401):
        return "Hetzner refused the API token (unauthorized): check BATON_HCLOUD_TOKEN"
    if error.code == "forbidden":
        return f"Hetzner forbids this with the configured token (forbidden: {error.message}): it needs read/write"
    if error.code == "rate_limit_exceeded":
        return f"Hetzner's rate limit held after retries (rate_limit_exceeded): {error.message}"
    return f"Hetzner API error ({error.code}): {error.message}"


def unreachable(endpoint: str, error: Exception) -> str:
    return f"could not reach the Hetzner API at {endpoint} ({type(error).__name__}): check BATON_HCLOUD_ENDPOINT and the network"


def _owned(server: BoundServer) -> OwnedMachine:
    labels = server.labels or {}
    attempt = labels.get(ATTEMPT_LABEL, "")
    return OwnedMachine(machine_id=server.id, task_id=labels.get(TASK_LABEL),
                        attempt=int(attempt) if attempt.isdigit() else None,
                        created_at=server.created.timestamp() if server.created else None)
