"""Composition root of the provisioner process."""

from __future__ import annotations

from services.provisioner.handlers import ProvisionerHandlers
from services.provisioner.local import LocalProvider
from services.provisioner.providers import providers_for
from services.provisioner.reaper import Reaper, live_attempts_in
from services.provisioner.remote_watcher import RemoteVmAgentWatcher
from services.provisioner.watcher import VmAgentWatcher
from services.runtime.bus import StreamLimits, open_bus
from services.runtime.nats_auth import service_credentials, vm_member_credentials
from services.runtime.partitions import HeldPartitions
from services.runtime.service import replica_of, serve
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore, store_env

NAME = "provisioner"


def vm_agent_environment(settings: Settings):  # noqa: ANN201 - the calls_home of providers_for
    """What a cloud VM's vm_agent is booted with: its identity (the workspace id), its expiring
    member credential (hello and assignment only) and how long it lingers for a follow-up; never
    the install secret or the cloud token."""
    def calls_home(workspace_id: str) -> dict[str, str]:
        # It lingers for a follow-up as long as a local one does, then exits (and its server goes).
        env = {"BATON_VM_ID": workspace_id, "BATON_LINGER_S": str(settings.linger_s)}
        if (credentials := vm_member_credentials(settings, workspace_id)) is not None:
            env["BATON_VM_AGENT_CREDS"] = credentials
        return env
    return calls_home


def alive_check_interval_s(linger_s: float) -> float:
    """How often a cloud vm_agent is asked whether it is there: at most half its linger, so the
    watcher hears it say its session ended before it leaves (a departure, not a loss)."""
    return max(0.5, min(5.0, linger_s / 2))


async def run(settings: Settings) -> None:
    store = ServiceStore(NAME, store_env(settings, NAME))
    local = LocalProvider(settings)
    local.pool.reset()
    async with open_bus(settings.nats_url, name=NAME, credentials=service_credentials(settings, NAME),
                       stream_limits=StreamLimits.from_settings(settings)) as bus:
        watcher = VmAgentWatcher(store, local, bus)
        held = HeldPartitions(replica_of(settings))
        handlers = ProvisionerHandlers(store, local, settings.faults, on_ready=watcher.watch, settings=settings,
                                       held=held)
        handlers.providers = providers_for(settings, local, handlers.record, calls_home=vm_agent_environment(settings),
                                           expect_hello=local.pool.members.expect_hello)
        cloud_loops = [Reaper(provider, live_attempts_in(store, name), every_s=settings.hcloud_reap_every_s).run()
                       for name, provider in handlers.providers.items() if name != "local"]
        if cloud_loops:
            await local.pool.members.connected()  # A booting VM's hello is heard from now on.
            members = local.pool.members
            cloud_loops.append(RemoteVmAgentWatcher(store, members.ask_alive, release=handlers.release_remote_workspace,
                                                    lose=handlers.lose_remote_workspace,
                                                    every_s=alive_check_interval_s(settings.linger_s)).run())
        handlers.resume_unsettled()
        local.pool.refill_soon()
        try:
            await serve(bus, name=NAME, settings=settings, store=store, handlers=handlers.handlers(),
                        loops=(watcher.run(), *cloud_loops), details=local.pool.status, held_partitions=held)
        finally:
            local.pool.stop_idle()
