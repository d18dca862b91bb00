"""The vm_agent process: connections out to NATS only (nothing listens), perhaps a warm agent;
once assigned a task, its store, relay and the task's commands. It exits once its session is over
and every event is relayed.

Started (or booted) with an identity `BATON_VM_ID` and, where the install mints them, a member
credential `BATON_VM_AGENT_CREDS` (`.creds` text: its hello and its assignment only, expiring). It
says hello on `baton.vm.member.<vm_id>.hello` once its warm agent is ready, takes its assignment
(with the task's own credential) on `.assign`, then answers `baton.vm.task.<task_id>.*`.

Reconnects: every connection reconnects forever (nats-py); subscriptions are renewed by it. Once a
credential expired the server refuses it: the vm_agent hears nothing more, the task runner's
commands find no responder (AgentStartRefused naming it), and the vm_agent exits as its session ends."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable
from pathlib import Path

import uvicorn
from nats.aio.client import Client

from services.runtime.bus import Bus, connect_nats
from services.runtime.logs import setup_logging
from services.runtime.nats_auth import credential_expiry, raw_credentials, vm_agent_inbox, vm_member_inbox
from services.runtime.relay import pending_envelopes
from services.runtime.settings import Settings
from services.runtime.vm_agent_commands import ID_PATTERN
from vm_agent.app import create_app
from vm_agent.backends import BACKENDS
from vm_agent.commands import VmAgentCommands, say_hello, serve_assignment
from vm_agent.runner import AgentLauncher
from vm_agent.sandbox import Sandbox
from vm_agent.state import VmAgent, directory_identity, end_unfinished_session, open_vm_agent_store

__all__ = ["end_unfinished_session", "main", "open_vm_agent_store"]

log = logging.getLogger(__name__)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vm_agent", description=__doc__)
    parser.add_argument("--state-dir", required=True, type=Path, help="its log and agent home")
    parser.add_argument("--vm-id", default=os.environ.get("BATON_VM_ID"),
                        help="its identity on the bus (default: BATON_VM_ID)")
    parser.add_argument("--debug-http-port", type=int, default=None,
                        help="also serve the HTTP API on 127.0.0.1 (local debugging; needs "
                             "BATON_VM_AGENT_TOKEN); the control plane never uses it")
    parser.add_argument("--warm-agent", default=None, choices=sorted(BACKENDS),
                        help="start this agent ahead of time, so a session starts at once")
    parser.add_argument("--workspace", type=Path, default=None,
                        help="the directory the warm agent works in: its task's workspace once the "
                             "provisioner moved the clone there (default: <state-dir>/workspace)")
    parser.add_argument("--linger-s", type=float, default=5.0,
                        help="stay up this long after the session ended and every event was relayed")
    parser.add_argument("--follow-up-linger-s", type=float, default=None,
                        help="…or this long after its last turn was pushed, for a follow-up "
                             "(default: BATON_LINGER_S)")
    return parser.parse_args(argv)


async def _exit_when_done(vm_agent: VmAgent, done: asyncio.Event, linger_s: float,
                          follow_up_linger_s: float) -> None:
    """Exit once the session is over, every event relayed, and no follow-up came for a while: a
    pushed turn waits `follow_up_linger_s` for one (its agent session stays), any other end `linger_s`."""
    loop = asyncio.get_running_loop()
    idle: tuple[int, float] | None = None  # (the session's turn, since when it is over)
    while True:
        await asyncio.sleep(0.2)
        assigned = vm_agent.assigned
        session = assigned.session if assigned else None
        if assigned is None or session is None or not session.ended:
            idle = None
            continue
        if idle is None or idle[0] != session.turn:
            idle = (session.turn, loop.time())
        wait_s = follow_up_linger_s if session.pushed_turn == session.turn else linger_s
        # The store is asked only once the wait is over: lingering costs no CPU (a query every
        # 0.2 s for the 5 minutes a finished task waits for a follow-up was most of its vm_agent's).
        if loop.time() - idle[1] >= wait_s and not pending_envelopes(assigned.store):
            done.set()
            return


async def _debug_http(vm_agent: VmAgent, commands: VmAgentCommands, port: int) -> None:
    """The HTTP API on 127.0.0.1 only, for a person debugging this machine."""
    if not vm_agent.debug_token:
        raise SystemExit("vm_agent: --debug-http-port needs BATON_VM_AGENT_TOKEN")
    server = uvicorn.Server(uvicorn.Config(create_app(vm_agent, commands), host="127.0.0.1", port=port,
                                           log_level="warning"))
    await server.serve()


async def _stop_when_credential_expires(vm_agent: VmAgent, member_expires_at: float | None,
                                        expired: asyncio.Event) -> None:
    """Its credential (the member's, then its task's) expired: NATS has dropped it and refuses it
    again, so it hears no command and can publish nothing. It stops; the provisioner's watcher
    relays what it recorded and ends a session it left running (a lost workspace: a new attempt)."""
    while True:
        expires_at = vm_agent.assigned.credential_expires_at if vm_agent.assigned else member_expires_at
        if expires_at is not None and time.time() >= expires_at:
            log.warning("this vm_agent's bus credential expired at %s: stopping", int(expires_at))
            expired.set()
            return
        await asyncio.sleep(1.0)


async def _member_connection(settings: Settings, vm_id: str, credentials: str | None) -> Client:
    """The connection it is known by before its assignment: with its member credential where the
    install minted one, else as the services connect (BATON_NATS_CREDS, or the URL's own)."""
    if credentials:
        return await connect_nats(settings.nats_url, name=f"vm_agent-{vm_id}", timeout_s=10,
                                  credentials=raw_credentials(credentials), inbox_prefix=vm_member_inbox(vm_id))
    return await connect_nats(settings.nats_url, name=f"vm_agent-{vm_id}", timeout_s=10,
                              credentials=str(settings.nats_creds) if settings.nats_creds else None)


async def serve(args: argparse.Namespace, settings: Settings) -> None:
    if not args.vm_id or not re.fullmatch(ID_PATTERN, args.vm_id):
        raise SystemExit("vm_agent: BATON_VM_ID (or --vm-id) must name it: letters, digits, '_' or '-'")
    member_credentials = os.environ.pop("BATON_VM_AGENT_CREDS", None)  # Never handed on.
    args.state_dir.mkdir(parents=True, exist_ok=True)
    connections: list[Client] = []

    async def connect(task_id: str, credentials: str | None) -> Bus:
        """The bus, with the workspace's own credential when the provisioner minted one."""
        if credentials is None:
            nc = await connect_nats(settings.nats_url, name=f"vm_agent-{task_id}", timeout_s=10,
                                    credentials=str(settings.nats_creds) if settings.nats_creds else None)
        else:
            nc = await connect_nats(settings.nats_url, name=f"vm_agent-{task_id}", timeout_s=10,
                                    credentials=raw_credentials(credentials),
                                    inbox_prefix=vm_agent_inbox(task_id))
        connections.append(nc)
        return Bus(nc=nc, js=nc.jetstream())

    # Agents never see the data dir, nor this vm_agent's state (its store, its log); they read
    # their adapters, installed in the agents dir (which may be in the data dir).
    sandbox = Sandbox.from_setting(settings.sandbox, hidden=(settings.data_dir, args.state_dir),
                                   readable=(settings.agents_root,))
    launcher = AgentLauncher(sandbox, home=args.state_dir / "home", agents_dir=settings.agents_root)
    vm_agent = VmAgent(os.environ.pop("BATON_VM_AGENT_TOKEN", ""), connect, settings.faults, launcher,
                       warm_backend=args.warm_agent, permission_timeout_s=settings.permission_timeout_s)
    if args.warm_agent:
        # Start the agent now: its start-up (seconds for some) is off the task's path.
        workspace = args.workspace or args.state_dir / "workspace"
        workspace.mkdir(mode=0o700, parents=True, exist_ok=True)
        vm_agent.warm_workspace = directory_identity(workspace)
        vm_agent.warming = asyncio.create_task(launcher.start(BACKENDS[args.warm_agent], workspace=workspace))
    commands = VmAgentCommands(vm_agent)
    member = await _member_connection(settings, args.vm_id, member_credentials)
    connections.append(member)
    await serve_assignment(member, args.vm_id, commands)
    follow_up_linger_s = settings.linger_s if args.follow_up_linger_s is None else args.follow_up_linger_s
    done, stopped = asyncio.Event(), asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # Stopped: stop its agent, close its connections.
        asyncio.get_running_loop().add_signal_handler(signum, stopped.set)
    watcher = asyncio.create_task(_exit_when_done(vm_agent, done, args.linger_s, follow_up_linger_s))
    expired = asyncio.Event()
    side = [asyncio.create_task(say_hello(member, args.vm_id, vm_agent)), asyncio.create_task(
        _stop_when_credential_expires(vm_agent, credential_expiry(member_credentials), expired))]
    if args.debug_http_port is not None:
        side.append(asyncio.create_task(_debug_http(vm_agent, commands, args.debug_http_port)))
    log.info("vm_agent %s connected to the bus (warm agent: %s; sandbox: %s)", args.vm_id, args.warm_agent,
             sandbox.describe())
    try:
        await _first_of(done.wait(), stopped.wait(), expired.wait())
        if stopped.is_set():
            await _let_runs_record_their_end(vm_agent)
    finally:
        await _stop(vm_agent, watcher, *side)
        for nc in connections:
            if not nc.is_closed:
                await nc.close()


async def _first_of(*waits: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


async def _let_runs_record_their_end(vm_agent: VmAgent, *, grace_s: float = 3.0) -> None:
    """Stopped by a signal (its process group's, which its agent also gets): a run whose agent
    exits records how its session ended (SessionFailed, with the agent's reason) before the
    process goes; what it recorded is relayed (by it, or by the provisioner's watcher)."""
    runs = [run for run in vm_agent.runs.values() if not run.done()]
    if runs:
        await asyncio.wait(runs, timeout=grace_s)


async def _stop(vm_agent: VmAgent, *helpers: asyncio.Task[None]) -> None:
    tasks = [*helpers, *vm_agent.runs.values()]
    if vm_agent.assigned is not None:
        tasks.append(vm_agent.assigned.relay)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if isinstance(vm_agent.warming, asyncio.Task):  # Started but never used.
        vm_agent.warming.cancel()
        with contextlib.suppress(BaseException):
            await (await vm_agent.warming).close()


def main(argv: list[str] | None = None) -> None:
    os.umask(0o077)  # Its store, log and workspace files are the owner's only.
    setup_logging("vm_agent")
    settings = Settings()
    os.nice(settings.task_nice)  # Its agent and their children inherit it.
    asyncio.run(serve(_parse_args(argv), settings))
