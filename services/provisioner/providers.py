"""What the provisioner needs from a place that makes workspaces, so another cloud is one adapter.

A provider provisions a workspace for a task's attempt (a `Placement`: where its vm_agent is, or
that it calls home over the bus), releases it, lists the machines this install owns (for the
reaper) and says what a machine costs. `local` (today's LocalProvider, adapted) and `hetzner`
satisfy it; `provider_problem` says at submit whether a provider can be used here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from events import BaseEvent
from services.runtime.settings import Settings

if TYPE_CHECKING:
    from services.provisioner.local import LocalProvider

KNOWN_PROVIDERS = ("local", "hetzner")


class ProvisionError(Exception):
    """No workspace could be made (by any provider); str() is the reason users see."""

RecordEvent = Callable[[str, BaseEvent], None]
"""How a provider puts a lifecycle event (ServerRequested, ServerCreated, ServerDeleted) on a
task's record: `record(task_id, event)`; the provisioner saves it with the task's Workspace."""


@dataclass(frozen=True)
class WorkspaceOrder:
    """One workspace to make: for task `task_id`'s attempt `attempt`."""

    task_id: str
    repo: str
    base_branch: str | None
    agent: str
    attempt: int = 1


@dataclass(frozen=True)
class Placement:
    """Where a provisioned workspace is. `vm_agent_url` is set when the control plane reaches the
    vm_agent (local); a cloud workspace's vm_agent calls home over the bus instead (None)."""

    workspace_id: str
    vm_agent_url: str | None
    credential_expires_at: float | None = None
    server_id: int | None = None


@dataclass(frozen=True)
class OwnedMachine:
    """A machine this install owns, as its labels say: whose (task, attempt) it is."""

    machine_id: int
    task_id: str | None
    attempt: int | None
    created_at: float | None = None


class WorkspaceProvider(Protocol):
    """What the provisioner asks of a provider (one adapter per place: local, hetzner, …)."""

    name: str

    async def provision(self, order: WorkspaceOrder) -> Placement:
        """A ready workspace for the order; raises ProvisionError (str(): the reason users see)."""
        ...

    async def release(self, task_id: str, *, attempt: int, reason: str) -> None:
        """Give the workspace back (a cloud server is deleted, its life and cost recorded)."""
        ...

    async def owned_machines(self) -> list[OwnedMachine]:
        """Every machine this install owns there (what the reaper checks against live tasks)."""
        ...

    async def delete_machine(self, machine: OwnedMachine, *, reason: str) -> None:
        """Delete a machine no live task owns."""
        ...


class LocalWorkspaces:
    """The local provider behind the interface: LocalProvider's clone and warm vm_agent, unchanged."""

    name = "local"

    def __init__(self, local: LocalProvider) -> None:
        self.local = local

    async def provision(self, order: WorkspaceOrder) -> Placement:
        url = await self.local.provision(order.task_id, order.repo, order.base_branch, agent=order.agent,
                                         attempt=order.attempt)
        suffix = f"-a{order.attempt}" if order.attempt > 1 else ""
        return Placement(workspace_id=f"local-{order.task_id}{suffix}", vm_agent_url=url,
                         credential_expires_at=self.local.credential_expires_at(order.task_id, attempt=order.attempt))

    async def release(self, task_id: str, *, attempt: int, reason: str) -> None:
        """A local vm_agent exits by itself once its session is over: nothing to delete."""

    async def owned_machines(self) -> list[OwnedMachine]:
        return []  # Local vm_agents are processes the watcher follows, not machines that bill.

    async def delete_machine(self, machine: OwnedMachine, *, reason: str) -> None:
        """Never called: it owns no machines (see owned_machines)."""


def providers_for(settings: Settings, local: LocalProvider, record: RecordEvent,
                  calls_home: Callable[[str], dict[str, str]],
                  expect_hello: Callable[[str], Awaitable[object]] | None = None) -> dict[str, WorkspaceProvider]:
    """Every provider usable here, by name (the provisioner's composition root builds them once):
    `local` always, `hetzner` when it is configured (provider_problem is None)."""
    providers: dict[str, WorkspaceProvider] = {"local": LocalWorkspaces(local)}
    if provider_problem("hetzner", settings) is None:
        from services.provisioner.hetzner import HetznerConfig, HetznerProvider  # (it imports this module)

        from services.provisioner.cloud_init import pinned_artifact

        providers["hetzner"] = HetznerProvider(HetznerConfig.from_settings(settings), secret=settings.install_secret(),
                                               record=record, calls_home=calls_home, expect_hello=expect_hello,
                                               artifact=lambda: pinned_artifact(settings.data_dir))
    return providers


def provider_problem(name: str, settings: Settings) -> str | None:
    """None if tasks may run on provider `name` here, else what to change (the 422 at submit)."""
    if name not in KNOWN_PROVIDERS:
        return f"unknown provider {name!r}: known providers are {', '.join(KNOWN_PROVIDERS)}"
    if name == "hetzner":
        missing = [env for env, value in (
            ("BATON_HCLOUD_TOKEN", settings.hcloud_token),
            ("BATON_VM_NATS_URL", settings.vm_nats_url),
            ("BATON_VM_GATEWAY_URL", settings.vm_gateway_url),
        ) if not value]
        if missing:
            return f"provider 'hetzner' is not configured here: set {', '.join(missing)} (see docs/hetzner.md)"
    return None
