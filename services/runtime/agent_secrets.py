"""Agents' credentials and Baton's own (`baton secrets set NAME`), kept encrypted under the data dir.

Each is one 0600 file `<data dir>/agent-secrets/<NAME>`: AES-GCM with a key derived from the
install secret, bound to its name (a file renamed to another name does not open). Only the
variables an agent kind declares, and those Baton's services use themselves (INSTALL_NAMES,
never handed to a vm_agent or an agent), may be stored. The provisioner hands them to its vm_agents
(which give each agent only its own kind's), and the gateway checks them at submit: both
through `agent_environ`, where a variable set where `baton up` runs wins over a stored one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path


from services.runtime.sealed import SealedFiles
from services.runtime.settings import Settings
from vm_agent.backends import AGENT_KINDS

_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,127}$")


INSTALL_NAMES = frozenset({"GITHUB_TOKEN"})
"""Secrets Baton's services use themselves (the pull-requests service's GitHub token; a variable
set where `baton up` runs, BATON_GITHUB_TOKEN, wins): kept here, never given to an agent."""


def declared_names() -> frozenset[str]:
    """Every variable some agent kind may receive."""
    return frozenset(name for kind in AGENT_KINDS.values() for name in kind.env)


class UnknownSecretName(ValueError):
    """Not a variable any agent kind declares; str() lists those that are."""


class AgentSecrets:
    def __init__(self, directory: Path, install_secret: str) -> None:
        self._files = SealedFiles(directory, install_secret, purpose=b"baton agent secrets v1")

    @classmethod
    def of(cls, settings: Settings) -> AgentSecrets:
        return cls(settings.data_dir / "agent-secrets", settings.install_secret())

    def set(self, name: str, value: str) -> None:
        """Keep `value` for `name`, encrypted (replacing the one kept before)."""
        self._files.write(self._declared(name), value.encode())

    def names(self) -> list[str]:
        return [name for name in self._files.names() if _NAME.match(name)]

    def unset(self, name: str) -> bool:
        """Forget `name`; False if it was not set."""
        return self._files.remove(self._declared(name))

    def values(self) -> dict[str, str]:
        """Every stored secret that opens with this install's key (others are skipped)."""
        opened = {name: self._files.read(name) for name in self.names()}
        return {name: plain.decode() for name, plain in opened.items() if plain is not None}

    def get(self, name: str) -> str | None:
        """The stored value of `name`, if it is set and opens with this install's key."""
        plain = self._files.read(self._declared(name)) if name in self.names() else None
        return plain.decode() if plain is not None else None

    @staticmethod
    def _declared(name: str) -> str:
        known = declared_names() | INSTALL_NAMES
        if name not in known:
            raise UnknownSecretName(
                f"{name!r} is not a variable any agent declares nor one Baton uses; these are: {', '.join(sorted(known))}")
        return name


def agent_environ(settings: Settings, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The agents' declared variables, from `environ` or else from the secrets store."""
    declared = declared_names()
    stored = AgentSecrets.of(settings).values()
    return {**{n: v for n, v in stored.items() if n in declared},
            **{n: v for n, v in environ.items() if n in declared and v}}
