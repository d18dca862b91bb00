"""The vm_agent process: its store, its relay to NATS, its HTTP API; exits once its session is over."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from pathlib import Path

import uvicorn

from services.runtime.bus import open_bus
from services.runtime.logs import setup_logging
from services.runtime.relay import Relay, pending_envelopes
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore, sqlite_env
from vm_agent.app import VmAgent, create_app
from vm_agent.domain import Session

log = logging.getLogger(__name__)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vm_agent", description=__doc__)
    parser.add_argument("--task-id", required=True)
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--advertise-host", default=None,
                        help="host name in the URL others use to reach this vm_agent (default: --host)")
    parser.add_argument("--linger-s", type=float, default=5.0,
                        help="stay up this long after the session ended and every event was relayed")
    return parser.parse_args(argv)


def open_vm_agent_store(state_dir: Path) -> ServiceStore:
    """The vm_agent's own store lives beside its workspace (on the VM), so it is always SQLite."""
    return ServiceStore("vm_agent", sqlite_env(state_dir / "events.sqlite"))


def end_unfinished_session(store: ServiceStore, task_id: str, *, reason: str) -> bool:
    """End a session a dead vm_agent process left unfinished with `reason`; True if there was one."""
    session = store.get_task_aggregate(Session, task_id)
    if session is None or session.ended:
        return False
    session.failed(reason)
    store.save(session)
    return True


async def _exit_when_done(vm_agent: VmAgent, server: uvicorn.Server, linger_s: float) -> None:
    while True:
        await asyncio.sleep(0.2)
        session = vm_agent.session()
        if session is not None and session.ended and not pending_envelopes(vm_agent.store):
            await asyncio.sleep(linger_s)
            server.should_exit = True
            return


async def serve(args: argparse.Namespace, settings: Settings) -> None:
    token = os.environ.get("BATON_VM_AGENT_TOKEN", "")
    if not token:
        raise SystemExit("vm_agent: BATON_VM_AGENT_TOKEN is not set; refusing to serve unauthenticated")
    args.state_dir.mkdir(parents=True, exist_ok=True)
    store = open_vm_agent_store(args.state_dir)
    end_unfinished_session(
        store, args.task_id, reason="the vm_agent restarted while the agent was running; the run was lost"
    )
    vm_agent = VmAgent(args.task_id, args.workspace.resolve(), token, store, settings.faults)
    sock = socket.create_server((args.host, args.port))
    server = uvicorn.Server(uvicorn.Config(create_app(vm_agent), log_level="warning"))
    async with open_bus(settings.nats_url, name=f"vm_agent-{args.task_id}") as bus:
        relay = asyncio.create_task(Relay(store, bus).run())
        watcher = asyncio.create_task(_exit_when_done(vm_agent, server, args.linger_s))
        port = sock.getsockname()[1]
        host = args.advertise_host or args.host
        url_file = args.state_dir / "url"
        url_file.with_suffix(".tmp").write_text(f"http://{host}:{port}")
        url_file.with_suffix(".tmp").replace(url_file)
        log.info("vm_agent for task %s listening on http://%s:%s", args.task_id, host, port)
        try:
            await server.serve(sockets=[sock])
        finally:
            for task in (relay, watcher, *vm_agent.runs.values()):
                task.cancel()
            await asyncio.gather(relay, watcher, *vm_agent.runs.values(), return_exceptions=True)


def main(argv: list[str] | None = None) -> None:
    setup_logging("vm_agent")
    asyncio.run(serve(_parse_args(argv), Settings()))
