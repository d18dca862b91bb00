"""One local vm_agent, as the provisioner sees it: a process (`VmAgentProcess`), forked by the
zygote (`Zygote`, the template process of `vm_agent/zygote.py`), and a peer on the bus
(`MemberBus`): started with an identity (`BATON_VM_ID`) and a member credential, it is ready when
its hello arrives and is assigned by a request on its own subject
(services/runtime/vm_agent_commands.py). Nothing listens on a vm_agent. The warm pool that keeps
them is `vm_agents.py`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import ValidationError

from services.runtime.bus import connect_nats
from services.runtime.nats_auth import service_credentials
from services.runtime.nats_fast_path import flush
from services.runtime.settings import Settings, secret_setting_names
from services.runtime.vm_agent_commands import AliveProbe, Assignment, CommandReply, Hello, member_subject, task_subject

log = logging.getLogger(__name__)


class VmAgentError(Exception):
    """No vm_agent could be had; str() is the reason users see."""


def this_machine() -> str:
    """Where a pid means something: this boot of this machine, in this pid namespace (each
    container has its own). Provisioner replicas elsewhere must not judge this one's vm_agents."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # No procfs (not Linux): the host's name is the best there is.
        return socket.gethostname()
    return f"{boot}/{namespace}"


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class VmAgentProcess:
    vm_id: str
    """Its identity on the bus (`baton.vm.member.<vm_id>.*`)."""
    pid: int
    state_dir: Path
    warm_agent: str | None
    workspace: Path | None = None
    """The empty directory its warm agent works in: the task's clone is moved into it
    (`local.py`, `move_clone_into`)."""
    credentials_version: str = ""
    """Which agents' credentials it was started with (a keyed hash, in memory only): a member
    started before `baton secrets set` is replaced, not assigned."""
    member_expires_at: float = float("inf")
    """When its member credential expires: it cannot be assigned after that."""
    hello: Hello | None = None
    """What it said when it came up (its warm agent's state)."""

    @property
    def url(self) -> str:
        """Its `vm_id`, under the name callers from the HTTP days read (tests/unit/test_agent_kinds.py);
        nothing listens at a vm_agent. To go once they read `vm_id`."""
        return self.vm_id

    @property
    def alive(self) -> bool:
        return process_alive(self.pid)

    def kill(self) -> None:
        kill_group(self.pid, signal.SIGTERM)  # The vm_agent stops its agent on the way out.


def kill_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # Each vm_agent leads a session (and process group) of its own.
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class MemberBus:
    """The provisioner's side of its members' subjects: hears their hellos, sends assignments.
    Connected (and listening for hellos) before any member starts, so no hello is missed."""

    def __init__(self, settings: Settings, *, assign_timeout_s: float = 30.0,
                 connect_timeout_s: float = 30.0) -> None:
        self._settings = settings
        self._assign_timeout_s = assign_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._nc: Client | None = None
        self._connecting = asyncio.Lock()
        self._hellos: dict[str, asyncio.Future[Hello]] = {}

    async def connected(self) -> None:
        async with self._connecting:
            if self._nc is None:
                nc = await connect_nats(self._settings.nats_url, name="provisioner-vm_agents",
                                        credentials=service_credentials(self._settings, "provisioner"),
                                        timeout_s=self._connect_timeout_s)
                await nc.subscribe(member_subject("*", "hello"), cb=self._on_hello)
                await flush(nc)
                self._nc = nc

    def expect_hello(self, vm_id: str) -> asyncio.Future[Hello]:
        return self._hellos.setdefault(vm_id, asyncio.get_running_loop().create_future())

    def forget(self, vm_id: str) -> None:
        self._hellos.pop(vm_id, None)

    async def _on_hello(self, msg: Msg) -> None:
        try:
            hello = Hello.model_validate_json(msg.data)
        except ValidationError:
            return
        waiting = self._hellos.pop(hello.vm_id, None)
        if msg.subject == member_subject(hello.vm_id, "hello") and waiting and not waiting.done():
            waiting.set_result(hello)

    async def assign(self, vm_id: str, assignment: Assignment, *, timeout_s: float | None = None) -> CommandReply:
        """Its answer; raises VmAgentError if it answers nothing (gone, or its credential expired).
        `timeout_s`: longer for a vm_agent that clones before it answers (a cloud VM)."""
        await self.connected()
        assert self._nc is not None
        timeout_s = timeout_s or self._assign_timeout_s
        try:
            reply = await self._nc.request(member_subject(vm_id, "assign"), assignment.model_dump_json().encode(),
                                           timeout=timeout_s)
        except nats.errors.NoRespondersError:
            raise VmAgentError(f"vm_agent {vm_id} is not on the bus (gone, or its credential expired)") from None
        except nats.errors.TimeoutError:
            raise VmAgentError(f"vm_agent {vm_id} did not answer its assignment within {timeout_s:.0f}s") from None
        except nats.errors.Error as error:
            raise VmAgentError(f"vm_agent {vm_id} could not be assigned: {error}") from None
        return CommandReply.model_validate_json(reply.data)

    async def ask_alive(self, task_id: str, *, timeout_s: float = 5.0) -> dict | None:
        """What the task's vm_agent answers to its AliveProbe on `baton.vm.task.<task_id>.alive`
        (its task, whether its session ended); None if it is not on the bus (no responder, or no
        answer in time)."""
        await self.connected()
        assert self._nc is not None
        try:
            reply = await self._nc.request(task_subject(task_id, "alive"), AliveProbe().model_dump_json().encode(),
                                           timeout=timeout_s)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return None
        try:
            return CommandReply.model_validate_json(reply.data).result
        except ValidationError:
            return {}

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()


class Zygote:
    """The provisioner's handle on its vm_agent template process; see `vm_agent/zygote.py`."""

    def __init__(self, log_path: Path, *, ready_timeout_s: float = 60.0) -> None:
        self._log_path = log_path
        self._ready_timeout_s = ready_timeout_s
        self._process: subprocess.Popen | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._started: asyncio.Task[bool] | None = None

    async def ready(self) -> bool:
        """Start it if needed; False if it cannot run (callers then start vm_agents directly)."""
        if self._process is not None and self._process.poll() is not None:
            log.warning("the vm_agent zygote exited with code %s; starting a new one", self._process.returncode)
            self._started = None
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._start())
        return await asyncio.shield(self._started)

    async def _start(self) -> bool:
        ours, theirs = socket.socketpair()
        env = {key: value for key, value in os.environ.items() if key not in secret_setting_names()}
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with theirs, self._log_path.open("ab") as log_handle:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "vm_agent.zygote", "--fd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log_handle,
                stderr=log_handle, env=env,
            )
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        try:
            hello = await asyncio.wait_for(self._reader.readline(), self._ready_timeout_s)
        except TimeoutError:
            hello = b""
        if json.loads(hello or b"{}").get("ready") is not True:
            log.warning("the vm_agent zygote did not start (see %s); starting vm_agents directly",
                        self._log_path)
            self.stop()
            return False
        return True

    async def fork(self, argv: list[str], *, env: dict[str, str], log_path: Path) -> int:
        """A new vm_agent process running `python -m vm_agent *argv`; its pid."""
        assert self._reader is not None and self._writer is not None
        async with self._lock:
            request = {"argv": argv, "env": env, "log": str(log_path)}
            self._writer.write(json.dumps(request).encode() + b"\n")
            await self._writer.drain()
            reply = json.loads(await self._reader.readline() or b'{"error": "the zygote exited"}')
        if "pid" not in reply:
            raise OSError(f"the vm_agent zygote could not fork: {reply.get('error')}")
        return int(reply["pid"])

    def stop(self) -> None:
        if self._writer is not None:
            self._writer.close()  # The zygote exits when its end of the socket closes.
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
