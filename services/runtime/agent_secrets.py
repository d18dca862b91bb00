"""Agents' credentials (`baton secrets set NAME`), kept encrypted under the data dir.

Each is one 0600 file `<data dir>/agent-secrets/<NAME>`: AES-GCM with a key derived from the
install secret, bound to its name (a file renamed to another name does not open). Only the
variables an agent kind declares may be stored. The provisioner hands them to its vm_agents
(which give each agent only its own kind's), and the gateway checks them at submit: both
through `agent_environ`, where a variable set where `baton up` runs wins over a stored one.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.runtime.settings import Settings, ensure_private_dir
from vm_agent.backends import AGENT_KINDS

_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,127}$")
_NONCE_BYTES = 12


def declared_names() -> frozenset[str]:
    """Every variable some agent kind may receive: what `baton secrets set` accepts."""
    return frozenset(name for kind in AGENT_KINDS.values() for name in kind.env)


class UnknownSecretName(ValueError):
    """Not a variable any agent kind declares; str() lists those that are."""


class AgentSecrets:
    def __init__(self, directory: Path, install_secret: str) -> None:
        self._directory = directory
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"baton agent secrets v1").derive(install_secret.encode())
        self._aead = AESGCM(key)

    @classmethod
    def of(cls, settings: Settings) -> AgentSecrets:
        return cls(settings.data_dir / "agent-secrets", settings.install_secret())

    def set(self, name: str, value: str) -> None:
        """Keep `value` for `name`, encrypted (replacing the one kept before)."""
        target = self._path(name)
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, value.encode(), name.encode())
        ensure_private_dir(self._directory)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, sealed)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(target)

    def names(self) -> list[str]:
        if not self._directory.is_dir():
            return []
        return sorted(p.name for p in self._directory.iterdir() if _NAME.match(p.name))

    def unset(self, name: str) -> bool:
        """Forget `name`; False if it was not set."""
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            return False
        return True

    def values(self) -> dict[str, str]:
        """Every stored secret that opens with this install's key (others are skipped)."""
        opened = {}
        for name in self.names():
            try:
                sealed = (self._directory / name).read_bytes()
                plain = self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], name.encode())
            except (OSError, InvalidTag, ValueError):
                continue
            opened[name] = plain.decode()
        return opened

    def _path(self, name: str) -> Path:
        if name not in declared_names():
            raise UnknownSecretName(
                f"{name!r} is not a variable any agent declares; these are: {', '.join(sorted(declared_names()))}")
        return self._directory / name


def agent_environ(settings: Settings, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The agents' declared variables, from `environ` or else from the secrets store."""
    declared = declared_names()
    stored = AgentSecrets.of(settings).values()
    return {**{n: v for n, v in stored.items() if n in declared},
            **{n: v for n, v in environ.items() if n in declared and v}}
