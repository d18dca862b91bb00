"""The control plane's vault for the credential a task's repo URL carried.

The gateway seals it for the task before anything is recorded; the provisioner opens it to
clone and hands it to the task's vm_agent (which keeps it in memory to push), then discards it.
On disk it is only ever encrypted (AES-GCM, a key derived from the install secret, bound to
the task id), in 0600 files under `<data dir>/credentials/`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.runtime.repo_url import RepoCredential
from services.runtime.settings import Settings, ensure_private_dir

_TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NONCE_BYTES = 12


class CredentialVault:
    def __init__(self, directory: Path, install_secret: str) -> None:
        self._directory = directory
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"baton repo credentials v1").derive(install_secret.encode())
        self._aead = AESGCM(key)

    @classmethod
    def of(cls, settings: Settings) -> CredentialVault:
        return cls(settings.data_dir / "credentials", settings.install_secret())

    def seal(self, task_id: str, credential: RepoCredential) -> None:
        """Keep `credential` for `task_id`, encrypted (replacing one sealed before)."""
        plain = json.dumps({"host": credential.host, "username": credential.username,
                            "password": credential.password}).encode()
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, plain, task_id.encode())
        ensure_private_dir(self._directory)
        target = self._path(task_id)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, sealed)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(target)

    def open(self, task_id: str) -> RepoCredential | None:
        """The credential sealed for `task_id`, or None if there is none (or it is unreadable:
        another install's secret, or tampered with)."""
        try:
            sealed = self._path(task_id).read_bytes()
        except FileNotFoundError:
            return None
        try:
            plain = self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], task_id.encode())
        except (InvalidTag, ValueError):
            return None
        return RepoCredential(**json.loads(plain))

    def discard(self, task_id: str) -> None:
        self._path(task_id).unlink(missing_ok=True)

    def _path(self, task_id: str) -> Path:
        if not _TASK_ID.match(task_id):
            raise ValueError(f"not a task id: {task_id!r}")
        return self._directory / task_id
