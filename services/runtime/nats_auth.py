"""Who may say what on the bus: the install's NATS operator, its account, and scoped user credentials.

NATS's decentralized auth: an **operator** key signs the **account** Baton uses; the account key
signs a **user** JWT per process, carrying that process's publish/subscribe permissions and an
expiry. The nats-server `baton up` starts trusts the operator (`server_config`), so a credential
minted here needs no server reload. A vm_agent starts (or a VM boots) with a member credential for
its own identity (hello, its assignment); at assignment it gets its workspace's credential, which
allows publishing only its own task's vm_agent events and hearing only its own task's commands.

The keys live in `<data dir>/nats-auth/` (0600, created once, atomically); they never leave the
control plane. A JWT is three base64url parts (header, claims, Ed25519 signature by the issuer's
nkey); `nkeys` (nats-io's own package) does the cryptography, and the format is checked against a
real nats-server by tests/capability/test_bus_auth.py and test_vm_agent_bus_permissions.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import nats
import nkeys
from nats.aio.client import Credentials, RawCredentials

from events.catalog import types_emitted_by
from events.client import reader_inbox
from events.envelope import STREAM
from services.runtime.settings import Settings, ensure_private_dir, nats_server_urls, write_private
from services.runtime.vm_agent_commands import MEMBER_PREFIX, TASK_PREFIX, member_subject, task_subject

JS_API_DENIED = ("$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>", "$JS.API.STREAM.MSG.DELETE.>")
"""No Baton process deletes or purges the record; a leaked service credential cannot either."""
SYNC_ALWAYS = "always"
"""JetStream fsyncs each message before its ack: an acked event survives a power loss, which the
relays rely on (they never republish what was acked). The cost is in docs/durability.md."""

_PREFIXES = {"operator": nkeys.PREFIX_BYTE_OPERATOR, "account": nkeys.PREFIX_BYTE_ACCOUNT,
             "user": nkeys.PREFIX_BYTE_USER}
_UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


def new_keypair(kind: str) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(secrets.token_bytes(32), _PREFIXES[kind]))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict, *,
               expires_at: float | None = None) -> str:
    """A NATS v2 JWT: `nats` claims (with their `type`), signed by `issuer`."""
    claims: dict = {"jti": "", "iat": int(time.time()), "iss": issuer.public_key.decode(),
                    "name": name, "sub": subject, "nats": {**nats, "version": 2}}
    if expires_at is not None:
        claims["exp"] = int(expires_at)
    claims["jti"] = base64.b32encode(hashlib.new("sha512_256", json.dumps(claims).encode()).digest()
                                     ).decode().rstrip("=")
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = f"{header}.{_b64(json.dumps(claims).encode())}"
    return f"{body}.{_b64(issuer.sign(body.encode()))}"


def decode_claims(jwt: str) -> dict:
    """The claims of a JWT (not verified: for showing what a credential allows)."""
    part = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def credential_expiry(creds: str | None) -> float | None:
    """When the `.creds` text's user JWT expires (Unix time), None if never (or no credential)."""
    if not creds or "-----BEGIN NATS USER JWT-----" not in creds:
        return None
    jwt = creds.split("-----BEGIN NATS USER JWT-----", 1)[1].split("------END", 1)[0].strip()
    expires_at = decode_claims(jwt).get("exp")
    return float(expires_at) if expires_at else None


@dataclass(frozen=True)
class Permissions:
    """Subjects a user may publish to and subscribe to (NATS wildcards), and what it may not."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    deny_publish: tuple[str, ...] = ()
    inbox_prefix: str = "_INBOX"
    deny_subscribe: tuple[str, ...] = ()
    allow_responses: bool = False
    """May reply (once, within a minute) to a request it received, whatever its reply subject."""

    def claims(self) -> dict:
        pub: dict = {"allow": list(self.publish)}
        if self.deny_publish:
            pub["deny"] = list(self.deny_publish)
        sub: dict = {"allow": list(self.subscribe)}
        if self.deny_subscribe:
            sub["deny"] = list(self.deny_subscribe)
        claims: dict = {"pub": pub, "sub": sub}
        if self.allow_responses:
            claims["resp"] = {"max": 1, "ttl": 60_000_000_000}  # nanoseconds, as Go's Duration
        return claims


def event_subjects(types: frozenset[str], task: str = "*") -> tuple[str, ...]:
    return tuple(f"baton.task.{task}.{name}" for name in sorted(types))


VM_COMMANDS_SENT_BY = {"task-runner": (task_subject("*", "*"),),
                       "provisioner": (member_subject("*", "assign"), task_subject("*", "alive"))}
"""Who may ask a vm_agent something: the task runner its task's commands, the provisioner an
assignment and whether a cloud VM's vm_agent still answers (`alive`)."""

VM_SUBJECTS_HEARD_BY = {"provisioner": (member_subject("*", "hello"),)}
"""What a service may hear of the vm_agents' subjects; no one else hears any (assignments carry secrets)."""


def service_permissions(service: str) -> Permissions:
    """A Baton service: the JetStream API (never deleting), its heartbeat, dead letters, and
    publishing only the events it emits. The provisioner also relays what a dead vm_agent
    recorded but had not published, so it may publish the vm_agent's events too. Only the task
    runner and the provisioner send vm_agents commands (`VM_COMMANDS_SENT_BY`); no service
    hears another's commands or replies on the vm_agents' subjects."""
    types = types_emitted_by(service)
    if service == "provisioner":
        types |= types_emitted_by("vm_agent")
    heard = VM_SUBJECTS_HEARD_BY.get(service, ())
    return Permissions(
        publish=("$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "_INBOX.>", f"baton.heartbeat.{service}",
                 "baton.deadletter.>", *event_subjects(types), *VM_COMMANDS_SENT_BY.get(service, ())),
        subscribe=(">",),
        deny_publish=JS_API_DENIED,
        deny_subscribe=_vm_subjects_unheard(heard),
    )


def _vm_subjects_unheard(heard: tuple[str, ...]) -> tuple[str, ...]:
    """The vm_agents' subjects a control-plane reader must not hear (deny beats allow in NATS)."""
    if not heard:
        return (f"{TASK_PREFIX}.>", f"{MEMBER_PREFIX}.>")
    return (f"{TASK_PREFIX}.>", member_subject("*", "assign"))


def vm_agent_inbox(task_id: str) -> str:
    return f"_INBOX_vm_{task_id}"


def vm_agent_permissions(task_id: str) -> Permissions:
    """One workspace's vm_agent: publish its own task's vm_agent events (and its dead letters),
    receive JetStream's acks on an inbox of its own, hear its own task's commands and answer each
    once; nothing else (no JetStream API)."""
    inbox = vm_agent_inbox(task_id)
    return Permissions(
        publish=(*event_subjects(types_emitted_by("vm_agent"), task_id),
                 f"baton.deadletter.vm_agent.{task_id}"),
        subscribe=(f"{inbox}.>", task_subject(task_id, "*")),
        inbox_prefix=inbox,
        allow_responses=True,
    )


def vm_member_inbox(vm_id: str) -> str:
    return f"_INBOX_vm_member_{vm_id}"


def vm_member_permissions(vm_id: str) -> Permissions:
    """A vm_agent not yet assigned, known by its identity `vm_id`: say hello on its own subject,
    hear its own assignment and answer it once; nothing else (no events, no JetStream)."""
    inbox = vm_member_inbox(vm_id)
    return Permissions(publish=(member_subject(vm_id, "hello"),),
                       subscribe=(member_subject(vm_id, "assign"), f"{inbox}.>"),
                       inbox_prefix=inbox, allow_responses=True)


def auditor_permissions() -> Permissions:
    """`baton audit verify|rebuild` and other readers on the control plane: read, never publish events."""
    return Permissions(publish=("$JS.API.>", "$JS.ACK.>", "_INBOX.>"), subscribe=(">",),
                       deny_publish=JS_API_DENIED, deny_subscribe=_vm_subjects_unheard(()))


def reader_durable(name: str) -> str:
    """The durable consumer a reader credential named `name` reads the stream through (prefixed, so
    a reader can never take over a service's own consumer)."""
    return f"reader-{name}"


def reader_permissions(durable: str) -> Permissions:
    """A service outside Baton (`baton credentials create --read-only`): create, inspect and pull
    from its own durable consumer `durable` on the event stream and ack what it read; nothing else
    (no publishing events, no deleting, no other consumer, no subject but its own inbox)."""
    consumer = f"{STREAM}.{durable}"
    inbox = reader_inbox(durable)
    return Permissions(
        publish=("$JS.API.INFO", f"$JS.API.STREAM.INFO.{STREAM}", f"$JS.API.CONSUMER.INFO.{consumer}",
                 f"$JS.API.CONSUMER.CREATE.{consumer}", f"$JS.API.CONSUMER.CREATE.{consumer}.>",
                 f"$JS.API.CONSUMER.DURABLE.CREATE.{consumer}", f"$JS.API.CONSUMER.MSG.NEXT.{consumer}",
                 f"$JS.ACK.{consumer}.>"),
        subscribe=(f"{inbox}.>",),
        inbox_prefix=inbox,
    )


def creds_text(jwt: str, seed: bytes) -> str:
    """The `.creds` file format nats-server's tools and every NATS client read."""
    return (f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n\n"
            "*************************************************************\n")


class InstallAuth:
    """The install's operator, system account and Baton account (keys under `directory`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        ensure_private_dir(directory)
        self.operator = self._key("operator", "operator")
        self.system = self._key("system-account", "account")
        self.account = self._key("account", "account")

    @classmethod
    def exists_in(cls, directory: Path) -> bool:
        return (directory / "account.nk").exists()

    def _key(self, name: str, kind: str) -> nkeys.KeyPair:
        path = self.directory / f"{name}.nk"
        try:
            seed = path.read_bytes().strip()
        except FileNotFoundError:
            seed = b""
        if not seed:
            tmp = path.with_name(f".{name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, new_keypair(kind).seed)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # The first process wins; the others read its key.
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            seed = path.read_bytes().strip()
        return nkeys.from_seed(bytearray(seed))

    def server_config(self, *, store_dir: Path | None = None, sync_interval: str = SYNC_ALWAYS) -> str:
        """nats-server configuration trusting this install's operator, with JetStream on and
        syncing to disk as `sync_interval` says (`always`: before each ack; docs/durability.md)."""
        operator_pub = self.operator.public_key.decode()
        system_pub = self.system.public_key.decode()
        account_pub = self.account.public_key.decode()
        operator_jwt = encode_jwt(self.operator, operator_pub, "baton",
                                  {"type": "operator", "system_account": system_pub})
        system_jwt = encode_jwt(self.operator, system_pub, "SYS", {"type": "account", "limits": {
            **_UNLIMITED, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}})
        account_jwt = self.account_jwt()
        store = f"store_dir: {json.dumps(str(store_dir))}, " if store_dir else ""
        jetstream = f"jetstream {{ {store}sync_interval: {json.dumps(sync_interval)} }}\n"
        return (f"# Written by Baton: trusts this install's NATS operator ({operator_pub}).\n"
                f"operator: {json.dumps(operator_jwt)}\n"
                f"system_account: {system_pub}\n"
                "resolver: MEMORY\n"
                f"resolver_preload: {{\n  {system_pub}: {json.dumps(system_jwt)}\n"
                f"  {account_pub}: {json.dumps(account_jwt)}\n}}\n"
                f"{jetstream}")

    def account_jwt(self) -> str:
        """Baton's account, signed by the operator, with every revoked user (`revoke`) in it."""
        claims: dict = {"type": "account", "limits": {
            **_UNLIMITED, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}}
        if revocations := self.revocations():
            claims["revocations"] = revocations
        return encode_jwt(self.operator, self.account.public_key.decode(), "baton", claims)

    def revocations(self) -> dict[str, int]:
        """Revoked user public keys and when (Unix time): their JWTs issued until then are refused."""
        try:
            return json.loads((self.directory / "revocations.json").read_text())
        except FileNotFoundError:
            return {}

    def revoke(self, user_public_key: str) -> str:
        """Record the user's revocation (kept in every later `server_config`); the new account JWT,
        for a running server to be told (`$SYS.REQ.ACCOUNT.<account>.CLAIMS.UPDATE`)."""
        revoked = {**self.revocations(), user_public_key: int(time.time())}
        write_private(self.directory / "revocations.json", json.dumps(revoked, indent=1))
        return self.account_jwt()

    def system_creds(self) -> str:
        """A short-lived user of the system account: what tells a running server of a new account JWT."""
        user = new_keypair("user")
        jwt = encode_jwt(self.system, user.public_key.decode(), "baton-system",
                         {"type": "user", "pub": {}, "sub": {}, **_UNLIMITED}, expires_at=time.time() + 60)
        return creds_text(jwt, user.seed)

    def user_creds(self, name: str, permissions: Permissions, *, ttl_s: float | None = None) -> str:
        """A new user's `.creds` text: its JWT (signed by the account) and its seed."""
        user = new_keypair("user")
        expires_at = time.time() + ttl_s if ttl_s is not None else None
        jwt = encode_jwt(self.account, user.public_key.decode(), name,
                         {"type": "user", **permissions.claims(), **_UNLIMITED}, expires_at=expires_at)
        return creds_text(jwt, user.seed)

    def write_creds(self, path: Path, name: str, permissions: Permissions) -> Path:
        """Mint a credential into `path` (0600, replaced atomically)."""
        return write_private(path, self.user_creds(name, permissions))


def install_auth_dir(settings: Settings) -> Path:
    return settings.data_dir / "nats-auth"


def service_credentials(settings: Settings, name: str) -> Credentials | None:
    """What a control-plane process connects with: BATON_NATS_CREDS if set; else, where the install
    has its own NATS operator (`baton up`'s NATS, or one configured by `baton nats-config`), a
    credential minted now for `name` (a service, or `auditor`); else none (the URL's own user or
    token, or an open NATS)."""
    if settings.nats_creds is not None:
        return str(settings.nats_creds)
    if not InstallAuth.exists_in(install_auth_dir(settings)):
        return None
    permissions = auditor_permissions() if name == "auditor" else service_permissions(name)
    return raw_credentials(InstallAuth(install_auth_dir(settings)).user_creds(name, permissions))


def vm_agent_credentials(settings: Settings, task_id: str) -> str | None:
    """The `.creds` text for the vm_agent of `task_id`'s workspace (its own task's events only,
    expiring), or None where the install has no NATS operator of its own (the vm_agent then uses
    BATON_NATS_CREDS or the URL, as the services do)."""
    if not InstallAuth.exists_in(install_auth_dir(settings)):
        return None
    return InstallAuth(install_auth_dir(settings)).user_creds(
        f"vm_agent-{task_id}", vm_agent_permissions(task_id), ttl_s=settings.vm_agent_credential_ttl_s)


def vm_member_credentials(settings: Settings, vm_id: str) -> str | None:
    """The `.creds` text a vm_agent is started (or a VM booted) with, before it has a task: its
    identity `vm_id`'s hello and assignment only, expiring; None where the install has no NATS
    operator of its own (as `vm_agent_credentials`)."""
    if not InstallAuth.exists_in(install_auth_dir(settings)):
        return None
    return InstallAuth(install_auth_dir(settings)).user_creds(
        f"vm_member-{vm_id}", vm_member_permissions(vm_id), ttl_s=settings.vm_agent_credential_ttl_s)


async def bus_is_open(url: str) -> bool:
    """True if NATS at `url` lets an anonymous client in (anyone on the network can then forge
    events or delete the stream); False if it refuses it, or cannot be reached."""
    try:
        nc = await nats.connect([_without_userinfo(one) for one in nats_server_urls(url)],
                                allow_reconnect=False, connect_timeout=2,
                                max_reconnect_attempts=0, error_cb=_expected_refusal)
    except Exception:  # noqa: BLE001 - refused, unreachable: not open to us.
        return False
    await nc.close()
    return True


async def _expected_refusal(error: Exception) -> None:
    """The refusal is the answer hoped for: nothing to log."""


def _without_userinfo(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url


def raw_credentials(text: str) -> RawCredentials:
    """For nats-py's `user_credentials=`: a credential held in memory, never written to disk."""
    return RawCredentials(text)
