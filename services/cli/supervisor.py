"""`baton up`: a nats-server (unless given one), every service as its own process, restarted if it dies."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.runtime.settings import Settings

SERVICE_NAMES = ("gateway", "task-runner", "provisioner", "projector", "monitor")


class SupervisorError(RuntimeError):
    """Something `baton up` needs is missing; str() says what to do."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_nats_server() -> str:
    found = shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/local/bin/nats-server") if Path(p).exists()), None
    )
    if found is None:
        raise SupervisorError(
            "nats-server is not installed. Install it (Debian/Ubuntu: `sudo apt-get install "
            "nats-server`; elsewhere see https://docs.nats.io/running-a-nats-service/introduction/"
            "installation), or pass --nats-url to use a NATS server with JetStream you already run."
        )
    return found


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    pid_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0
    restart_at: float | None = None

    def start(self, env: dict[str, str]) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # Ctrl-C reaches `baton up`, which stops children in order.
            )
        self.pid_path.write_text(str(self.process.pid))

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Supervisor:
    settings: Settings
    nats_url: str | None = None
    say: callable = print
    children: dict[str, Child] = field(default_factory=dict)
    nats: subprocess.Popen | None = None

    def start(self) -> None:
        """Start NATS (if needed) and every service; returns once all are spawned."""
        self.settings.install_secret()  # Created once, before any service needs it.
        if self.nats_url is None:
            self.nats_url = self._start_nats()
        env = {
            **os.environ,
            "BATON_DATA_DIR": str(self.settings.data_dir),
            "BATON_NATS_URL": self.nats_url,
            "BATON_HOST": self.settings.host,
            "BATON_PORT": str(self.settings.port),
            "BATON_FAULTS": ",".join(sorted(self.settings.faults)),
        }
        if self.settings.database_url:
            env["BATON_DATABASE_URL"] = self.settings.database_url
        self._env = env
        for name in SERVICE_NAMES:
            child = Child(
                name,
                [sys.executable, "-m", "services.cli.main", "service", name],
                self.settings.path("logs", f"{name}.log"),
                self.settings.path("run", f"{name}.pid"),
            )
            child.start(env)
            self.children[name] = child

    def _start_nats(self) -> str:
        binary = find_nats_server()
        port = free_port()
        store = self.settings.path("nats", "jetstream")
        log = self.settings.path("logs", "nats.log")
        self.nats = subprocess.Popen(
            [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store), "-l", str(log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return f"nats://127.0.0.1:{port}"

    def check(self) -> None:
        """Restart any service that died (with backoff); call this every fraction of a second."""
        now = time.monotonic()
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

    def stop(self) -> None:
        for child in self.children.values():
            child.stop()
        self._stop_vm_agents()
        if self.nats is not None and self.nats.poll() is None:
            self.nats.terminate()
            self.nats.wait(10)

    def _stop_vm_agents(self) -> None:
        for pid_file in (self.settings.data_dir / "vm_agents").rglob("pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError, PermissionError):
                pass
