"""`baton up`: a nats-server (unless given one), every service as its own process, restarted if it dies.

Stopping is bounded and complete. Every process `baton up` starts, and every process those start
(vm_agents, their agents, whatever the agents run), carries `BATON_SUPERVISOR_PID` and the data
dir in its environment, which is how it is found again (`data_dir_processes.py`):

- `stop()` sends SIGTERM to every service at once and waits for them under one deadline
  (SIGKILL after it); every other process of the data dir (vm_agents and their agents, each in
  a session of its own) gets SIGTERM as soon as the provisioner is gone and is waited for the
  same way; NATS last. Each step runs in a `finally`; `baton up` ignores Ctrl-C while stopping.
- A service dies with `baton up`: it asks the kernel for SIGHUP when its parent dies
  (PR_SET_PDEATHSIG, `services/cli/main.py:service`); the nats-server we start gets SIGTERM.
  The provisioner, told so, stops the vm_agents on its way out (`stop_data_dir_processes`).
- One `baton up` per data dir (a lock), and it first stops whatever a previous one on the
  same data dir left running: those processes belong to a run that is over, and a vm_agent of
  it, once gone, is settled by the provisioner's watcher (its task ends with a reason).

A service that hangs (stopped, its event loop blocked) is killed and restarted too: each pings
the supervisor's watchdog socket from its event loop, systemd's way (`runtime/watchdog.py`), and
one silent for `BATON_WATCHDOG_S` gets SIGKILL, which frees what it held (its store's relay
lease first of all).
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from services import registry
from services.cli.data_dir_processes import (
    PR_SET_PDEATHSIG, STOP_DEADLINE_S, SUPERVISOR_PID_ENV, data_dir_processes, signal_process, stop_data_dir_processes,
)
from services.runtime.nats_auth import InstallAuth, bus_is_open, install_auth_dir
from services.runtime.nats_server import NatsServerError, nats_server_binary
from services.runtime.settings import Settings, write_private
from services.runtime.watchdog import WatchdogListener, WatchdogPinger

SERVICE_NAMES = registry.SERVICE_NAMES


class SupervisorError(RuntimeError):
    """Something `baton up` needs is missing; str() says what to do."""


def running_nats_url_path(settings: Settings) -> Path:
    """Where a running `baton up` keeps the URL of the NATS it runs (or was given): 0600, written
    once NATS is up, removed when it stops (a `baton up` killed with -9 leaves it behind)."""
    return settings.path("run", "nats.url")


def running_nats_url(settings: Settings) -> str | None:
    """The URL of the NATS a `baton up` on this data dir runs, if one wrote it."""
    try:
        return running_nats_url_path(settings).read_text().strip() or None
    except FileNotFoundError:
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_nats_server() -> str:
    try:
        return nats_server_binary()
    except NatsServerError as error:
        raise SupervisorError(f"{error}; or pass --nats-url to use a NATS server with JetStream you "
                              "already run.") from error


def _host_port(url: str) -> tuple[str, int]:
    rest = url.partition("://")[2].rpartition("@")[2].split(",")[0]
    host, _, port = rest.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port or 4222)


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    pid_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0
    restart_at: float | None = None
    pinged_at: float | None = None
    """When its last watchdog ping came (time.monotonic()); None until its first one."""
    own_env: dict[str, str] = field(default_factory=dict)
    """What this one process gets besides the shared environment (a replica: BATON_REPLICA, its port)."""

    def start(self, env: dict[str, str]) -> None:
        self.pinged_at = None
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env={**env, **self.own_env},
                # Ctrl-C reaches `baton up` only, which stops the children in order. A child
                # dies with `baton up` all the same: it sets PR_SET_PDEATHSIG itself (`service`).
                start_new_session=True,
            )
        tmp = self.pid_path.with_suffix(".tmp")
        tmp.write_text(str(self.process.pid))
        tmp.replace(self.pid_path)  # Readers never see it empty.

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        if self.running:
            self.process.terminate()

    def wait_until(self, deadline: float) -> bool:
        """True once it exited; False if it still runs at `deadline` (time.monotonic())."""
        if self.process is None:
            return True
        try:
            self.process.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        if self.running:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout_s: float = STOP_DEADLINE_S) -> None:
        self.terminate()
        if not self.wait_until(time.monotonic() + timeout_s):
            self.kill()


@dataclass
class Supervisor:
    settings: Settings
    nats_url: str | None = None
    say: callable = print
    children: dict[str, Child] = field(default_factory=dict)
    nats: subprocess.Popen | None = None
    stop_deadline_s: float = STOP_DEADLINE_S
    _lock: IO[str] | None = None
    bus_open: bool | None = None
    """Whether NATS let an anonymous client in (checked at start); None if it was not reached."""
    replicas: int = 1
    """Processes of each service (`baton up --replicas N`)."""
    watchdog: WatchdogListener | None = None
    """Where the services' watchdog pings arrive (None: BATON_WATCHDOG_S=0)."""
    watched_by: WatchdogPinger | None = None
    """`baton up`'s own watchdog, when systemd gives it one (its unit's WatchdogSec)."""

    def start(self) -> None:
        """Start NATS (if needed) and every service; returns once all are spawned."""
        self._take_lock()
        self._stop_leftovers()
        self.settings.install_secret()  # Created once, before any service needs it.
        self._marks = {
            SUPERVISOR_PID_ENV: str(os.getpid()),
            "BATON_DATA_DIR": os.path.abspath(self.settings.data_dir),
        }
        if self.nats_url is None:
            self.nats_url = self._start_nats()
        self._check_bus_auth()
        write_private(running_nats_url_path(self.settings), self.nats_url)  # For `baton credentials revoke`.
        env = {
            **os.environ,
            **self._marks,
            "BATON_NATS_URL": self.nats_url,
            "BATON_HOST": self.settings.host,
            "BATON_PORT": str(self.settings.port),
            "BATON_FAULTS": ",".join(sorted(self.settings.faults)),
        }
        self.watched_by = WatchdogPinger.for_this_process()
        for inherited in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # Ours to give, not systemd's.
            env.pop(inherited, None)
        if self.settings.watchdog_s > 0:
            self.watchdog = WatchdogListener(self.settings.watchdog_s)
            env.update(self.watchdog.env())
        if self.settings.database_url:
            env["BATON_DATABASE_URL"] = self.settings.database_url
        self._env = env
        for name in SERVICE_NAMES:
            for child in self._replicas_of(name):
                self.children[child.name] = child
                child.start(env)

    def _replicas_of(self, service: str) -> list[Child]:
        """The service's processes: one named after it, or with --replicas N, `<service>-<i>`
        (i from 0) with BATON_REPLICA=i/N, each gateway on the next port."""
        argv = [sys.executable, "-m", "services.cli.service", service]
        if self.replicas == 1:
            return [Child(service, argv, self.settings.path("logs", f"{service}.log"),
                          self.settings.path("run", f"{service}.pid"))]
        children = []
        for index in range(self.replicas):
            name = f"{service}-{index}"
            own_env = {"BATON_REPLICA": f"{index}/{self.replicas}"}
            if service == "gateway":
                own_env["BATON_PORT"] = str(self.settings.port + index)
            children.append(Child(name, argv, self.settings.path("logs", f"{name}.log"),
                                  self.settings.path("run", f"{name}.pid"), own_env=own_env))
        return children

    def _take_lock(self) -> None:
        """One `baton up` per data dir: two would share stores and vm_agents, and stop each other's."""
        lock_path = self.settings.path("run", "up.lock")
        handle = lock_path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise SupervisorError(f"another `baton up` (pid {holder}) runs on {self.settings.data_dir}; "
                                  f"stop it first, or use another --data-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle  # Held until this process exits, however it exits.

    def _stop_leftovers(self) -> None:
        """Stop what a previous `baton up` on this data dir left running (it was killed, or it
        predates PR_SET_PDEATHSIG): its services, its NATS, its vm_agents and their agents."""
        started = time.monotonic()
        count, _ = stop_data_dir_processes(self.settings.data_dir, deadline_s=self.stop_deadline_s)
        if count:
            self.say(f"stopped {count} processes a previous `baton up` on {self.settings.data_dir} "
                     f"left running ({time.monotonic() - started:.1f}s)")

    def _check_bus_auth(self) -> None:
        """Say loudly when the bus lets anyone in (a `--nats-url` without auth): it is then the
        weakest door of the install. Our own NATS must refuse an anonymous client, or we stop."""
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(_host_port(self.nats_url), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    return  # Unreachable: the services say so themselves, and retry.
                time.sleep(0.05)
        self.bus_open = asyncio.run(bus_is_open(self.nats_url))
        if self.bus_open and self.nats is not None:
            raise SupervisorError(f"the nats-server started for {self.settings.data_dir} lets anonymous "
                                  "clients in; refusing to run on an open bus")
        if self.bus_open:
            self.say("WARNING: THE BUS IS OPEN. The NATS at --nats-url lets clients in without "
                     "credentials: anyone who reaches it can forge events or delete the history. "
                     "Configure it with `baton nats-config` (or give BATON_NATS_CREDS); see the "
                     "README's Security model.")

    def _start_nats(self) -> str:
        binary = find_nats_server()
        port = free_port()
        store = self.settings.path("nats", "jetstream")
        log = self.settings.path("logs", "nats.log")
        # The server trusts only this install's operator: every client needs a credential it minted.
        config = write_private(self.settings.path("nats", "server.conf"),
                               InstallAuth(install_auth_dir(self.settings)).server_config(store_dir=store))
        parent = os.getpid()
        prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

        def die_with_us() -> None:  # In the child, between fork and exec: no allocation-heavy work.
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
                if os.getppid() != parent:  # `baton up` died before the line above.
                    os.kill(os.getpid(), signal.SIGKILL)

        self.nats = subprocess.Popen(
            [binary, "-c", str(config), "-a", "127.0.0.1", "-p", str(port), "-l", str(log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, **self._marks}, start_new_session=True, preexec_fn=die_with_us,
        )
        self.settings.path("run", "nats.pid").write_text(str(self.nats.pid))
        return f"nats://127.0.0.1:{port}"

    def check(self) -> None:
        """Restart any service that died (with backoff), kill any that hung (its watchdog pings
        stopped); call this every fraction of a second."""
        now = time.monotonic()
        if self.watched_by is not None:
            self.watched_by.ping_if_due(now)
        self._kill_the_hung(now)
        for child in self.children.values():
            assert child.process is not None
            if child.process.poll() is None:
                continue
            if child.restart_at is None:
                delay = min(0.25 * 2**child.restarts, 5.0)
                child.restart_at = now + delay
                self.say(f"service {child.name} exited with code {child.process.returncode}; "
                         f"restarting in {delay:.2f}s (log: {child.log_path})")
            elif now >= child.restart_at:
                child.restarts += 1
                child.restart_at = None
                child.start(self._env)
        if self.nats is not None and self.nats.poll() is not None:
            raise SupervisorError(f"nats-server exited with code {self.nats.returncode}; "
                                  f"see {self.settings.data_dir / 'logs' / 'nats.log'}")

    def _kill_the_hung(self, now: float) -> None:
        """SIGKILL to every running service that pinged the watchdog once and then fell silent
        for its interval: stopped or stuck, it holds leases only a live process should."""
        if self.watchdog is None:
            return
        by_pid = {child.process.pid: child for child in self.children.values() if child.running}
        for pid in self.watchdog.senders():
            if pid in by_pid:
                by_pid[pid].pinged_at = now
        for child in by_pid.values():
            if child.pinged_at is not None and now - child.pinged_at > self.watchdog.interval_s:
                self.say(f"service {child.name} (pid {child.process.pid}) sent no watchdog ping for "
                         f"{now - child.pinged_at:.0f}s (hung or stopped); killed (log: {child.log_path})")
                child.kill()

    def stop(self) -> None:
        """Services (all at once), then every vm_agent and agent, then NATS: each step runs even
        if the one before it was interrupted, and each is bounded by `stop_deadline_s`."""
        marks = [("", time.monotonic())]
        try:
            self._stop_services()
        finally:
            marks.append(("services", time.monotonic()))
            try:
                self._stop_vm_agents()
            finally:
                marks.append(("vm_agents", time.monotonic()))
                running_nats_url_path(self.settings).unlink(missing_ok=True)
                if self.watchdog is not None:
                    self.watchdog.close()
                self._stop_nats()
                marks.append(("nats", time.monotonic()))
                if self.children:
                    steps = ", ".join(f"{name} {end - begin:.1f}s" for (_, begin), (name, end) in zip(marks, marks[1:]))
                    self.say(f"stopped in {marks[-1][1] - marks[0][1]:.1f}s ({steps})")

    def _stop_services(self) -> None:
        # The provisioner first: once it is gone, nothing starts or watches vm_agents, and they
        # can be told to stop while the other services finish.
        running = sorted((child for child in self.children.values() if child.running),
                         key=lambda child: not child.name.startswith("provisioner"))
        for child in running:
            child.terminate()
        deadline = time.monotonic() + self.stop_deadline_s
        for child in running:
            if not child.wait_until(deadline):
                self.say(f"service {child.name} did not stop within {self.stop_deadline_s:.0f}s "
                         f"of SIGTERM; killed (log: {child.log_path})")
                child.kill()
            if child.name.startswith("provisioner") and not any(
                    other.running for other in running if other.name.startswith("provisioner")):
                self._signal_vm_agents()  # The last provisioner is gone.

    def _spared(self) -> frozenset[int]:
        """Ours but not vm_agents: NATS, and services not stopped yet."""
        alive = [child.process.pid for child in self.children.values() if child.running]
        return frozenset([*alive, *([self.nats.pid] if self.nats is not None else [])])

    def _signal_vm_agents(self) -> None:
        """SIGTERM to every vm_agent and agent now; `_stop_vm_agents` then waits for them."""
        spare, own_group = self._spared(), os.getpgrp()
        for pid, pgid in data_dir_processes(self.settings.data_dir).items():
            if pid not in spare:
                signal_process(pid, signal.SIGTERM, group=pid == pgid and pgid != own_group)

    def _stop_vm_agents(self) -> None:
        """Every vm_agent (each in a session of its own; pid files under vm_agents/), its agent,
        and anything else of this data dir still running but NATS: found by their environment,
        which also finds an agent whose vm_agent is already gone."""
        if not hasattr(self, "_marks"):
            return  # Nothing was started.
        _, killed = stop_data_dir_processes(self.settings.data_dir, deadline_s=self.stop_deadline_s,
                                            spare=self._spared())
        if killed:
            self.say(f"{killed} vm_agent processes did not stop within {self.stop_deadline_s:.0f}s "
                     f"of SIGTERM; killed")

    def _stop_nats(self) -> None:
        if self.nats is not None and self.nats.poll() is None:
            self.nats.terminate()
            try:
                self.nats.wait(self.stop_deadline_s)
            except subprocess.TimeoutExpired:
                self.nats.kill()
                self.nats.wait()
