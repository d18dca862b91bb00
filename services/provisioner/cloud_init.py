"""How a cloud server becomes a Baton workspace: its user_data (a cloud-init shell script), the
vm_agent artifact it fetches from the control plane, and the credential that fetch carries.

The artifact is the control plane's own code (the packages a vm_agent imports), so a VM runs
exactly the version the control plane runs, fetched from the control plane (never from a package
index the user did not choose). The VM only connects out: to the gateway (once, for the artifact),
to the bus and to the git origin; nothing on it listens on the internet.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import io
import os
import shlex
import tarfile
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACT_PACKAGES = ("vm_agent", "events", "services/__init__.py", "services/runtime")
"""What a vm_agent imports (vm_agent, the event contract, the runtime it shares with services)."""
USER_DATA_LIMIT = 32 * 1024
"""Hetzner's limit on user_data."""
DIST_PATH = "/api/vm-agent/dist/{version}.tar.gz"
STATE_DIR = "/var/lib/baton/vm_agent"


@dataclass(frozen=True)
class Artifact:
    """The vm_agent as a gzipped tarball: `version` is Baton's version and the content's hash."""

    version: str
    data: bytes = field(repr=False)


@functools.cache
def vm_agent_artifact() -> Artifact:
    """The vm_agent of this control plane, built once per process from its own source files
    (sorted, mtimes zeroed, so the same code is the same bytes and the same version)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for path in _artifact_files():
            _add_file(tar, path.relative_to(REPO_ROOT).as_posix(), path.read_bytes())
        _add_file(tar, "requirements.txt", "\n".join(_requirements()).encode() + b"\n")
    data = buffer.getvalue()
    # The gzip header carries the build time: the version hashes the files, not the bytes.
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in _artifact_files())).hexdigest()[:12]
    return Artifact(version=f"{_baton_version()}+{digest}", data=data)


def pinned_artifact(data_dir: Path) -> Artifact:
    """The vm_agent artifact of this `baton up` run, the same in every service: the first service to
    need it builds it and keeps it in the data dir, keyed by the supervisor's pid, so a provisioner
    restarted after the code changed on disk still announces the version the gateway serves. Outside
    `baton up` (no BATON_SUPERVISOR_PID) each process builds its own."""
    run = os.environ.get("BATON_SUPERVISOR_PID")
    if not run:
        return vm_agent_artifact()
    pinned = data_dir / "run" / f"vm_agent-{run}.artifact"
    if not pinned.exists():
        artifact = vm_agent_artifact()
        pinned.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        staged = pinned.with_name(f"{pinned.name}.{os.getpid()}")
        staged.write_bytes(artifact.version.encode() + b"\n" + artifact.data)
        with contextlib.suppress(FileExistsError):  # Another service pinned it first: theirs counts.
            os.link(staged, pinned)
        staged.unlink()
        for earlier in pinned.parent.glob("vm_agent-*.artifact"):  # Earlier runs' pins.
            if earlier != pinned:
                earlier.unlink(missing_ok=True)
    version, _, data = pinned.read_bytes().partition(b"\n")
    return Artifact(version=version.decode(), data=data)


def _artifact_files() -> list[Path]:
    files: list[Path] = []
    for name in ARTIFACT_PACKAGES:
        root = REPO_ROOT / name
        files += [root] if root.is_file() else [p for p in root.rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(files)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _baton_version() -> str:
    try:
        return version("baton")
    except PackageNotFoundError:
        return "0+unknown"


def _requirements() -> list[str]:
    try:
        return [r for r in requires("baton") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        return []


def dist_credential(secret: str, workspace_id: str, expires_at: float) -> str:
    """The per-workspace credential that fetches the vm_agent artifact until `expires_at`:
    `<workspace_id>.<expiry>.<HMAC of both under the install secret>` (never the secret)."""
    expiry = str(int(expires_at))
    return f"{workspace_id}.{expiry}.{_dist_mac(secret, workspace_id, expiry)}"


def check_dist_credential(secret: str, credential: str, *, now: float | None = None) -> str | None:
    """The workspace a dist credential was issued to, or None if it is forged or expired."""
    parts = credential.rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    workspace_id, expiry, mac = parts
    if not hmac.compare_digest(mac, _dist_mac(secret, workspace_id, expiry)):
        return None
    return workspace_id if int(expiry) > (time.time() if now is None else now) else None


def _dist_mac(secret: str, workspace_id: str, expiry: str) -> str:
    scope = f"vm_agent-dist/{workspace_id}/{expiry}"
    return hmac.new(secret.encode(), scope.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class BootPlan:
    """What a server's user_data needs: where to fetch the vm_agent, with what, and how it calls home."""

    workspace_id: str
    gateway_url: str
    """The control plane's URL as the VM reaches it (BATON_VM_GATEWAY_URL)."""
    version: str
    dist_credential: str = field(repr=False)
    nats_url: str
    """The bus as the VM reaches it (BATON_VM_NATS_URL, `tls://…`)."""
    vm_agent_env: dict[str, str] = field(default_factory=dict, repr=False)
    """The vm_agent's own environment (its scoped bus credential and task); never the cloud token."""
    vm_agent_args: tuple[str, ...] = ("--state-dir", STATE_DIR)
    """Its identity is BATON_VM_ID in `vm_agent_env`; it opens no port (it connects out to the bus)."""


def build_user_data(plan: BootPlan) -> str:
    """A cloud-init shell script that installs the vm_agent `plan.version` from the control plane
    and starts it with `plan.vm_agent_env` (it only connects out). Fits Hetzner's 32 KiB."""
    env = {"BATON_NATS_URL": plan.nats_url, "BATON_WORKSPACE_ID": plan.workspace_id, **plan.vm_agent_env}
    env_lines = "\n".join(f"{key}={shlex.quote(value)}" for key, value in sorted(env.items()))
    url = plan.gateway_url.rstrip("/") + DIST_PATH.format(version=plan.version)
    args = " ".join(shlex.quote(arg) for arg in plan.vm_agent_args)
    script = f"""#!/bin/sh
# Baton workspace {plan.workspace_id}: install and start the vm_agent {plan.version} from the control plane.
set -eu
umask 077
mkdir -p /opt/baton/app {STATE_DIR} /var/log/baton
cat > /opt/baton/env <<'BATON_ENV'
{env_lines}
BATON_ENV
printf 'Authorization: Bearer %s\\n' {shlex.quote(plan.dist_credential)} > /opt/baton/dist-auth
curl --fail --silent --show-error --retry 30 --retry-delay 2 --retry-all-errors \\
  -H @/opt/baton/dist-auth -o /opt/baton/vm_agent.tar.gz {shlex.quote(url)}
rm -f /opt/baton/dist-auth
tar -xzf /opt/baton/vm_agent.tar.gz -C /opt/baton/app
PYTHON=python3
if ! python3 -c 'import nats, acp, pydantic_settings, eventsourcing, fastapi, uvicorn' 2>/dev/null; then
  apt-get install -y -q python3-venv git >/var/log/baton/apt.log 2>&1 || true
  python3 -m venv /opt/baton/venv
  /opt/baton/venv/bin/pip install -q -r /opt/baton/app/requirements.txt >/var/log/baton/pip.log 2>&1
  PYTHON=/opt/baton/venv/bin/python
fi
cd /opt/baton/app
set -a; . /opt/baton/env; set +a
rm -f /opt/baton/env  # Its member credential is in the vm_agent's environment only (not on disk for an agent).
PYTHONPATH=/opt/baton/app nohup "$PYTHON" -m vm_agent {args} >/var/log/baton/vm_agent.log 2>&1 &
echo "baton vm_agent {plan.version} started"
"""
    if len(script.encode()) > USER_DATA_LIMIT:
        raise ValueError(f"user_data is {len(script.encode())} bytes; Hetzner takes at most {USER_DATA_LIMIT}")
    return script
