"""How Baton runs git on a task's repository: hooks off, only the allowed transports on, never
a prompt, and a repo credential handed over by a credential helper through the git process's
environment (never in argv, never in a URL, never stored by a user's helper)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from services.runtime.repo_url import KNOWN_SCHEMES, RepoCredential
from services.runtime.settings import ensure_private_dir

# git's credential protocol: answer `get` for the credential's host only (a redirect to another
# host gets nothing); the values come from this git process's environment.
_HELPER = (
    '!f() { test "$1" = get || exit 0; h=; while IFS= read -r line; do case "$line" in '
    'host=*) h="${line#host=}";; esac; done; test "$h" = "$BATON_GIT_HOST" || exit 0; '
    "printf 'username=%s\\npassword=%s\\n' \"$BATON_GIT_USERNAME\" \"$BATON_GIT_PASSWORD\"; }; f"
)
_CREDENTIAL_VARIABLES = ("BATON_GIT_HOST", "BATON_GIT_USERNAME", "BATON_GIT_PASSWORD")
_PROMPTERS = ("GIT_ASKPASS", "SSH_ASKPASS")


def hardened_config(schemes: Iterable[str]) -> list[str]:
    """`-c` options for every git command Baton runs on a repo: no hooks, no fsmonitor, and no
    transport but the allowed schemes' (never `ext`, which runs a program)."""
    transports = sorted(set(schemes) & KNOWN_SCHEMES)
    options = ["core.hooksPath=/dev/null", "core.fsmonitor=false", "core.askPass=",
               "protocol.allow=never", *(f"protocol.{name}.allow=always" for name in transports)]
    return [arg for option in options for arg in ("-c", option)]


def credential_config(credential: RepoCredential | None) -> list[str]:
    """`-c` options that make git ask our helper, and only it (a user's `store` helper would
    otherwise write the credential to a file)."""
    if credential is None:
        return []
    return ["-c", "credential.helper=", "-c", f"credential.helper={_HELPER}",
            "-c", "credential.interactive=never"]


def git_environment(credential: RepoCredential | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one git process: no prompt, and the credential (if any) for the helper."""
    env = {key: value for key, value in (os.environ if base is None else base).items()
           if key not in _PROMPTERS and key not in _CREDENTIAL_VARIABLES}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    if credential is not None:
        env.update(BATON_GIT_HOST=credential.host, BATON_GIT_USERNAME=credential.username,
                   BATON_GIT_PASSWORD=credential.password)
    return env


def redact(text: str, credential: RepoCredential | None) -> str:
    """`text` (git's own message) with the credential's secret replaced by `***`: the password,
    or a lone token given as the user name. (git never gets it in a URL, so cannot echo it;
    this is the second line.)"""
    secret = credential and (credential.password or credential.username)
    # A very short one would only mangle the message ("u" in "git clone").
    return text.replace(secret, "***") if secret and len(secret) >= 4 else text


def vm_agent_git_dir(state_dir: Path) -> Path:
    """Where the provisioner keeps a copy of the clone's git dir, made before the agent could see
    the workspace (in the vm_agent's state dir, hidden from the sandbox): the only git dir the
    vm_agent ever runs git on. The workspace's own `.git` is the agent's."""
    return state_dir / "git"


def save_clone_git_dir(workspace: Path, state_dir: Path) -> Path:
    """Copy the fresh clone's `.git` to the vm_agent's git dir: a real copy (no hardlink, no
    symlink followed), so nothing the agent later does to its `.git` reaches it."""
    ensure_private_dir(state_dir)
    saved = vm_agent_git_dir(state_dir)
    if saved.exists():
        shutil.rmtree(saved)
    shutil.copytree(workspace / ".git", saved, symlinks=True)
    saved.chmod(0o700)
    return saved
