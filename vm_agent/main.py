"""The vm_agent process: an HTTP API, a NATS connection, perhaps a warm agent; once assigned a
task, its store and relay. It exits once its session is over and every event is relayed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path

import uvicorn
from nats.aio.client import Client

from services.runtime.bus import Bus, connect_nats
from services.runtime.logs import setup_logging
from services.runtime.nats_auth import raw_credentials, vm_agent_inbox
from services.runtime.relay import pending_envelopes
from services.runtime.settings import Settings
from vm_agent.app import create_app
from vm_agent.backends import BACKENDS
from vm_agent.runner import AgentLauncher
from vm_agent.sandbox import Sandbox
from vm_agent.state import VmAgent, directory_identity, end_unfinished_session, open_vm_agent_store

__all__ = ["end_unfinished_session", "main", "open_vm_agent_store"]

log = logging.getLogger(__name__)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vm_agent", description=__doc__)
    parser.add_argument("--state-dir", required=True, type=Path, help="where it writes its url")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--advertise-host", default=None,
                        help="host name in the URL others use to reach this vm_agent (default: --host)")
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


async def _exit_when_done(vm_agent: VmAgent, server: uvicorn.Server, linger_s: float,
                          follow_up_linger_s: float) -> None:
    """Exit once the session is over, every event relayed, and no follow-up came for a while: a
    pushed turn waits `follow_up_linger_s` for one (its agent session stays), any other end `linger_s`."""
    loop = asyncio.get_running_loop()
    idle: tuple[int, float] | None = None  # (the session's turn, since when it is over)
    while True:
        await asyncio.sleep(0.2)
        assigned = vm_agent.assigned
        session = assigned.session if assigned else None
        if assigned is None or session is None or not session.ended or pending_envelopes(assigned.store):
            idle = None
            continue
        if idle is None or idle[0] != session.turn:
            idle = (session.turn, loop.time())
        wait_s = follow_up_linger_s if session.pushed_turn == session.turn else linger_s
        if loop.time() - idle[1] >= wait_s:
            server.should_exit = True
            return


def _write_url(state_dir: Path, url: str) -> None:
    tmp = state_dir / "url.tmp"
    tmp.write_text(url)
    tmp.replace(state_dir / "url")


async def serve(args: argparse.Namespace, settings: Settings) -> None:
    token = os.environ.get("BATON_VM_AGENT_TOKEN", "")
    if not token:
        raise SystemExit("vm_agent: BATON_VM_AGENT_TOKEN is not set; refusing to serve unauthenticated")
    args.state_dir.mkdir(parents=True, exist_ok=True)
    sock = socket.create_server((args.host, args.port))
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
    vm_agent = VmAgent(token, connect, settings.faults, launcher, warm_backend=args.warm_agent,
                       permission_timeout_s=settings.permission_timeout_s)
    if args.warm_agent:
        # Start the agent now: its start-up (seconds for some) is off the task's path.
        workspace = args.workspace or args.state_dir / "workspace"
        workspace.mkdir(mode=0o700, parents=True, exist_ok=True)
        vm_agent.warm_workspace = directory_identity(workspace)
        vm_agent.warming = asyncio.create_task(launcher.start(BACKENDS[args.warm_agent], workspace=workspace))
    server = uvicorn.Server(uvicorn.Config(create_app(vm_agent), log_level="warning"))
    follow_up_linger_s = settings.linger_s if args.follow_up_linger_s is None else args.follow_up_linger_s
    watcher = asyncio.create_task(_exit_when_done(vm_agent, server, args.linger_s, follow_up_linger_s))
    url = f"http://{args.advertise_host or args.host}:{sock.getsockname()[1]}"
    _write_url(args.state_dir, url)
    log.info("vm_agent listening on %s (warm agent: %s; sandbox: %s)", url, args.warm_agent, sandbox.describe())
    try:
        await server.serve(sockets=[sock])
    finally:
        await _stop(vm_agent, watcher)
        for nc in connections:
            await nc.close()


async def _stop(vm_agent: VmAgent, watcher: asyncio.Task[None]) -> None:
    tasks = [watcher, *vm_agent.runs.values()]
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
    asyncio.run(serve(_parse_args(argv), Settings()))
