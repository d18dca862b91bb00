"""Where an agent runs on the local provider: in a bubblewrap sandbox, with an allowlisted environment.

In the sandbox the agent reads the whole system, writes only its workspace (at `/workspace`), a
private home (at `/agent-home`) and its own `/tmp`, uses the network, and sees none of the data
dir (stores, secrets, tokens, NATS credentials, other workspaces, vm_agent state dirs): each hidden
directory is an empty tmpfs. It sees only its own processes (`--unshare-pid`), so not the
vm_agent's environment either, and it dies with the vm_agent (`--die-with-parent`).

The sandbox's root is an empty tmpfs with every top-level entry of the host's `/` bound read-only
(`/tmp`, `/dev`, `/proc` made fresh), then made read-only itself: `--ro-bind / /` alone would do as
well, except that no mount point could then be made for `/workspace` on a read-only root.

A bind mount follows the directory, not its path: an agent started ahead of time on an empty
directory (a warm pool member's future workspace) works in whatever that directory becomes once
the provisioner moves the task's clone into it and renames it to the task's workspace path.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

WORKSPACE_VIEW = Path("/workspace")
"""The agent's workspace as the agent sees it in the sandbox (its cwd and ACP `session/new` cwd)."""
HOME_VIEW = Path("/agent-home")
"""The agent's private home as it sees it in the sandbox."""

ALLOWED_ENV = frozenset({
    "PATH", "LANG", "LANGUAGE", "TERM", "COLORTERM", "NO_COLOR", "TZ", "USER", "LOGNAME", "SHELL",
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR",
    "PYTHONPATH",  # Where Baton's code is on a cloud VM (its `shell` agent is a module of it); no secret.
})
"""What an agent's environment may hold besides `LC_*`, its HOME and the variables its kind declares."""
PROCESS_MARKS = ("BATON_SUPERVISOR_PID", "BATON_DATA_DIR")
"""How `baton up` finds the processes of its data dir to stop them (not secrets). In the sandbox
only the outer bwrap process carries them (the agent dies with it); unsandboxed, the agent does."""
PERSONAL_SECRETS = (
    "~/.ssh", "~/.gnupg", "~/.aws", "~/.azure", "~/.config/gcloud", "~/.config/gh", "~/.docker",
    "~/.kube", "~/.netrc", "~/.git-credentials", "~/.pgpass", "~/.npmrc", "~/.pypirc", "~/.claude",
    "~/.codex", "~/.gemini", "/run/docker.sock", "/var/run/docker.sock", "/var/lib/cloud",
)
"""The user's own keys and tokens (and the Docker socket, which is root on the host; on a cloud VM,
cloud-init's copy of the user_data, which holds the vm_agent's member credential): the agent
reads the system, but these are hidden like the data dir. The agent's own credentials come from
the variables its kind declares, never from the user's files."""
_HIDDEN_TOP_LEVEL = frozenset({"proc", "dev", "tmp"})
_PROBE_TIMEOUT_S = 10.0


class SandboxUnavailable(Exception):
    """The sandbox is required (BATON_SANDBOX=bwrap) but cannot be made here; str() says why."""


@dataclass(frozen=True)
class AgentLaunch:
    """How to start one agent: `argv` with `env`, from `cwd` (host paths); `workspace_view` is
    the workspace as the agent sees it (ACP `session/new`'s cwd) when that is not its host path."""

    argv: tuple[str, ...]
    env: dict[str, str]
    cwd: Path
    workspace_view: Path | None


@dataclass(frozen=True)
class Sandbox:
    """How agents are confined here: `mode` is `bwrap`, `none` or `unavailable` (bwrap required
    but not working); `problem` says why there is no sandbox."""

    mode: str
    hidden: tuple[Path, ...] = ()
    problem: str | None = None
    readable: tuple[Path, ...] = ()
    """Directories readable (read-only) in the sandbox even inside a hidden one (the agents dir)."""

    @classmethod
    def from_setting(cls, setting: str, *, hidden: Iterable[Path], readable: Iterable[Path] = ()) -> Sandbox:
        """The sandbox for BATON_SANDBOX=`setting` (auto, bwrap, none), hiding the `hidden` dirs
        but for the `readable` ones."""
        hidden = tuple(Path(os.path.realpath(path)) for path in hidden)
        readable = tuple(Path(os.path.abspath(path)) for path in readable)
        if setting == "none":
            return cls("none", hidden, "BATON_SANDBOX=none", readable)
        problem = bwrap_problem()
        if problem is None:
            return cls("bwrap", hidden, None, readable)
        return cls("unavailable" if setting == "bwrap" else "none", hidden, problem, readable)

    def describe(self) -> str:
        """One line for `/api/health` and `baton up`."""
        if self.mode == "bwrap":
            return "bwrap"
        if self.mode == "unavailable":
            return f"required but unavailable — agents will not start: {self.problem}"
        return f"none — agents can read the data dir ({self.problem})"

    def launch(
        self, command: Sequence[str], *, workspace: Path, home: Path, env_names: Iterable[str] = (),
        environ: Mapping[str, str] = os.environ,
    ) -> AgentLaunch:
        """How to start `command` confined to `workspace` (and `home`), with an environment of the
        allowlist plus `env_names` taken from `environ`; raises SandboxUnavailable."""
        if self.mode == "unavailable":
            raise SandboxUnavailable(
                f"the agent sandbox is required (BATON_SANDBOX=bwrap) but {self.problem}; install "
                "bubblewrap (apt-get install bubblewrap) or set BATON_SANDBOX=auto")
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = agent_environment(environ, env_names)
        marks = {name: environ[name] for name in PROCESS_MARKS if name in environ}
        if self.mode == "none":
            return AgentLaunch(tuple(command), {**env, **marks, "HOME": str(home)}, workspace, None)
        argv = ("bwrap", *bwrap_options(workspace=workspace, home=home, hidden=self.hidden,
                                        readable=self.readable),
                *[arg for name in marks for arg in ("--unsetenv", name)], "--", *command)
        return AgentLaunch(argv, {**env, **marks, "HOME": str(HOME_VIEW)}, workspace, WORKSPACE_VIEW)


def agent_environment(environ: Mapping[str, str], declared: Iterable[str]) -> dict[str, str]:
    """The variables of `environ` an agent may see: the allowlist, `LC_*` and those its kind
    `declared` (its API key…); never a BATON_ one."""
    wanted = ALLOWED_ENV | set(declared)
    return {name: value for name, value in environ.items()
            if (name in wanted or name.startswith("LC_")) and not name.startswith("BATON_")}


def bwrap_options(
    *, workspace: Path, home: Path, hidden: Iterable[Path], readable: Iterable[Path] = (),
) -> list[str]:
    """bwrap's options for a sandbox over `workspace` and `home` that hides the `hidden` dirs,
    but for the `readable` ones (read-only, at their own path)."""
    options = [*_system_read_only(), "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    personal = [Path(os.path.realpath(os.path.expanduser(p))) for p in PERSONAL_SECRETS]
    for path in _outermost([Path("/tmp"), *hidden, *personal]):
        if path == Path("/tmp") or not os.path.lexists(path):
            continue
        if path.is_dir():
            options += ["--tmpfs", str(path)]
        else:  # A file or a socket: what the agent finds there is empty.
            options += ["--ro-bind", "/dev/null", str(path)]
    for code in _code_roots(hidden):  # What the agent itself runs (a venv under /tmp, say).
        options += ["--ro-bind", str(code), str(code)]
    for path in readable:
        options += ["--ro-bind-try", os.path.realpath(path), str(path)]
    options += ["--bind", str(workspace), str(WORKSPACE_VIEW), "--bind", str(home), str(HOME_VIEW),
                "--remount-ro", "/", "--chdir", str(WORKSPACE_VIEW),
                "--unshare-pid", "--unshare-ipc", "--die-with-parent", "--new-session",
                # Run by root, bwrap keeps every capability (CAP_SYS_ADMIN could unmount what hides
                # the data dir): none is needed.
                "--cap-drop", "ALL"]
    return options


def _outermost(paths: Iterable[Path]) -> list[Path]:
    """`paths` without those inside another one (hiding the outer one hides them)."""
    paths = sorted(set(paths))
    return [path for path in paths if not any(path != other and path.is_relative_to(other) for other in paths)]


def _system_read_only() -> list[str]:
    """Every top-level entry of `/`, read-only (symlinks such as /bin -> usr/bin as they are)."""
    options: list[str] = []
    for entry in sorted(os.scandir("/"), key=lambda e: e.name):
        if entry.name in _HIDDEN_TOP_LEVEL:
            continue
        if entry.is_symlink():
            options += ["--symlink", os.readlink(entry.path), entry.path]
        else:
            options += ["--ro-bind-try", entry.path, entry.path]
    return options


def _code_roots(hidden: Iterable[Path]) -> list[Path]:
    """The Python and the Baton code an agent command runs, where the sandbox would hide them."""
    roots = {Path(sys.prefix), Path(sys.base_prefix), Path(__file__).resolve().parents[1]}
    covered = [Path("/tmp"), *hidden]
    return sorted(root for root in roots if any(root.is_relative_to(place) for place in covered))


@functools.cache
def bwrap_problem() -> str | None:
    """None if bwrap can make the sandbox here, else why not (checked once, by running it)."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    with tempfile.TemporaryDirectory(prefix="baton-sandbox-probe-") as probe:
        options = bwrap_options(workspace=Path(probe), home=Path(probe), hidden=())
        try:
            done = subprocess.run(["bwrap", *options, "--", "true"], capture_output=True, text=True,
                                  timeout=_PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"bwrap could not be run: {error}"
    if done.returncode != 0:
        return f"bwrap cannot make a sandbox here: {done.stderr.strip() or f'exit code {done.returncode}'}"
    return None
