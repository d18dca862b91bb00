"""A nats-server on a free port and a `baton up` stack, each a real process, stopped in `finally`."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.runtime.agent_secrets import declared_names
from services.runtime.nats_auth import InstallAuth, auditor_permissions, service_permissions
from services.runtime.nats_server import nats_server_binary
from tests.support.waiting import wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]
AGENT_VARIABLES = declared_names() | {"BATON_AGENTS_DIR", "BATON_WARM_AGENTS"}
"""What a stack takes from the test's environment only when the test says so."""

_stopping: list[threading.Thread] | None = None
"""The stops `running_stack` left running, while `stops_off_the_tests_path` is open."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class NatsServer:
    """A nats-server with JetStream. With `trusting` (a Baton data dir) it is configured as
    `baton nats-config` configures one: only credentials minted by that install get in."""

    store_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    trusting: Path | None = None
    token: str | None = None
    """A server that lets in only clients giving this token (nats-server's own `--auth`)."""

    @property
    def url(self) -> str:
        return f"nats://{self.token + '@' if self.token else ''}127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        if self.trusting is None:
            options = ["-js", "-sd", str(self.store_dir)]
        else:
            config = self.store_dir.parent / f"{self.store_dir.name}.conf"
            self.store_dir.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(InstallAuth(self.trusting / "nats-auth").server_config(store_dir=self.store_dir))
            options = ["-c", str(config)]
        if self.token is not None:
            options += ["--auth", self.token]
        self.process = subprocess.Popen(
            [nats_server_binary(), *options, "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: socket.create_connection(("127.0.0.1", self.port), 0.5).close() or True,
                 timeout_s=20, what=f"nats-server on port {self.port}")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@dataclass
class BatonStack:
    """`baton up` against a given NATS (or, with `nats=None`, the one it starts), with its own
    data dir and port."""

    nats: NatsServer | None
    data_dir: Path
    faults: str = ""
    database_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    replicas: int = 1
    """`baton up --replicas`: processes of each service (gateway i on `port` + i)."""
    options: tuple[str, ...] = ()
    """More of `baton up`'s options (`--demo`)."""

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def nats_url(self) -> str:
        """The bus this stack uses (the given NATS, or the one `baton up` started and printed)."""
        if self.nats is not None:
            return self.nats.url
        found = re.search(r"nats: (nats://\S+)", self.log_path.read_text())
        assert found, f"baton up did not say which NATS it runs: {self.log_path}"
        return found.group(1)

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        """The API token `baton up` created in its data dir."""
        return (self.data_dir / "api-token").read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        """The header that authenticates a request (HTTP or WebSocket) to this stack."""
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> BatonStack:
        # A developer's own agent keys never reach a test's stack: only those a test gives it.
        base = {name: value for name, value in os.environ.items() if name not in AGENT_VARIABLES}
        env = {**base, "BATON_FAULTS": self.faults, "PYTHONUNBUFFERED": "1", **self.extra_env}
        env.pop("BATON_API", None)
        env.pop("BATON_API_TOKEN", None)
        env.pop("BATON_DATABASE_URL", None)
        if self.database_url:
            env["BATON_DATABASE_URL"] = self.database_url
        self.log_path = self.data_dir / "baton-up.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli.main", "up", "--port", str(self.port),
                 "--data-dir", str(self.data_dir), *(["--nats-url", self.nats.url] if self.nats else []),
                 *(["--replicas", str(self.replicas)] if self.replicas > 1 else []), *self.options],
                stdout=log, stderr=log, env=env, cwd=REPO_ROOT, start_new_session=True,
            )
        wait_for(self.healthy, timeout_s=90, what="GET /api/health = 200")
        return self

    def healthy(self) -> bool:
        return httpx.get(f"{self.api}/api/health", timeout=2).status_code == 200

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)

    def nats_credentials(self, name: str = "auditor") -> str:
        """A credential for this stack's bus, minted as the install mints one: a service's
        (e.g. `gateway`), or a reader's (`auditor`). Written under the data dir (0600); its path."""
        auth = InstallAuth(self.data_dir / "nats-auth")
        permissions = auditor_permissions() if name == "auditor" else service_permissions(name)
        return str(auth.write_creds(self.data_dir / "nats-auth" / f"test-{name}.creds", name, permissions))

    def service_pid(self, name: str) -> int:
        return int((self.data_dir / "run" / f"{name}.pid").read_text())

    def kill_service(self, name: str) -> None:
        """kill -9 one service and wait until `baton up` has restarted it."""
        old = self.service_pid(name)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: self.service_pid(name) != old, timeout_s=30, what=f"{name} restarted")

    def vm_agent_pid(self, task_id: str) -> int:
        return int((self.data_dir / "vm_agents" / task_id / "pid").read_text())

    def logs(self) -> str:
        """Every log of the stack, for a failing test's report."""
        parts = []
        for path in sorted(self.data_dir.rglob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"==== {path.relative_to(self.data_dir)}\n{text[-4000:]}")
        return "\n".join(parts)


@contextmanager
def running_stack(
    root: Path, *, faults: str = "", database_url: str | None = None, env: dict[str, str] | None = None,
    agents_dir: Path | None = None,
) -> Iterator[BatonStack]:
    """A nats-server of its own and `baton up` on it; both stopped on exit. `agents_dir`: where
    its agents' adapters are installed (tests.support.agents.install_agents), else its data dir's."""
    if agents_dir is not None:
        env = {**(env or {}), "BATON_AGENTS_DIR": str(agents_dir)}
    # The bus is authenticated as `baton up`'s own is: this NATS trusts the stack's data dir.
    nats = NatsServer(store_dir=root / "nats", trusting=root / "baton").start()
    stack = BatonStack(nats=nats, data_dir=root / "baton", faults=faults,
                       database_url=database_url, extra_env=env or {})
    try:
        yield stack.start()
    finally:
        stop_soon(stack, nats)


def stop_soon(stack: BatonStack, nats: NatsServer | None) -> None:
    """`baton up`, then its NATS (if it was given one), stopped in order: in a thread of its own
    while `stops_off_the_tests_path` is open (the next test starts meanwhile), else here and now."""
    def stop() -> None:
        try:
            stack.stop()
        finally:
            if nats is not None:
                nats.stop()

    if _stopping is None:
        stop()
        return
    _stopping.append(threading.Thread(target=stop, name=f"stopping {stack.data_dir}"))
    _stopping[-1].start()


@contextmanager
def stops_off_the_tests_path() -> Iterator[None]:
    """While open, a `running_stack` that ends is stopped beside the next test rather than before it
    (a stop is seconds of waiting for processes to exit); on close, waits for every such stop."""
    global _stopping
    _stopping = []
    try:
        yield
    finally:
        finish_stopping()
        _stopping = None


def finish_stopping() -> None:
    """Wait until every stack `running_stack` is stopping off the test's path has stopped."""
    while _stopping:
        _stopping.pop().join()
