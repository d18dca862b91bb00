"""A task's repository URL, checked: an allowed scheme, no option or transport injection, and
any credential in it taken out (it travels sealed, never in the URL that is recorded)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

KNOWN_SCHEMES = frozenset({"https", "http", "ssh", "git", "file"})
"""What BATON_REPO_SCHEMES may name (`ssh` includes scp-style `user@host:path`; an absolute local
path counts as `file`). Remote helpers such as `ext::` are never allowed."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TRANSPORT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9+.-]*)::")
_SCP = re.compile(r"^(?:([^@/:]+)@)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(.*)$", re.DOTALL)
# scp form with a password: `user:SECRET@host:path` (git would read `user` as the host).
_SCP_PASSWORD = re.compile(r"^[^@/:]+:[^@/]*@(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]*)(:[0-9]{1,5})?$")


class RepoUrlError(ValueError):
    """The repo URL cannot be used; str() says what to change (never repeating a credential)."""


@dataclass(frozen=True)
class RepoCredential:
    """What git presents to `host` (`host[:port]`, as git's credential protocol names it)."""

    host: str
    username: str = field(repr=False)
    password: str = field(default="", repr=False)


@dataclass(frozen=True)
class RepoUrl:
    url: str
    """The URL without any credential: the only form that is ever recorded."""
    scheme: str
    """One of KNOWN_SCHEMES: how git will reach it."""
    credential: RepoCredential | None = None


def schemes_hint(allowed: Iterable[str]) -> str:
    return (f"allowed repo schemes: {', '.join(sorted(allowed))} (an absolute path counts as file); "
            f"an operator changes them with BATON_REPO_SCHEMES, e.g. BATON_REPO_SCHEMES=https,ssh,file,http")


def parse_repo_url(raw: str, *, allowed: Iterable[str]) -> RepoUrl:
    """The checked form of `raw`, or RepoUrlError saying what to change."""
    allowed = frozenset(allowed) & KNOWN_SCHEMES
    text = raw.strip()
    if not text:
        raise RepoUrlError("repo must not be blank")
    if _CONTROL.search(text):
        raise RepoUrlError("repo must not contain control characters (NUL, newline, tab…)")
    if text.startswith("-"):
        raise RepoUrlError("repo must not start with '-' (git would read it as an option)")
    scheme = scheme_of(text)
    if scheme not in allowed:
        raise RepoUrlError(f"repo scheme {scheme!r} is not allowed; {schemes_hint(allowed)}")
    if scheme == "file" and text.startswith("/"):
        return RepoUrl(text, "file")
    if _URL.match(text) is None:
        return _from_scp(text)
    return _from_url(text, scheme)


def scheme_of(text: str) -> str:
    """How git would reach `text` (a stripped repo URL): a URL's scheme, `ssh` for scp-style
    `user@host:path`, `file` for an absolute path."""
    if (url := _URL.match(text)) is not None:
        return url.group(1).lower()
    if (transport := _TRANSPORT.match(text)) is not None:
        raise RepoUrlError(f"repo must be a URL or a path, not a git remote helper "
                           f"('{transport.group(1)}::…' runs a program); use https://, ssh:// or file://")
    if text.startswith("/"):
        return "file"
    if _SCP.match(text) is not None:
        return "ssh"
    raise RepoUrlError("repo must be a URL (https://host/x.git, ssh://…, file:///…), "
                       "user@host:path, or an absolute path")


_WHERE_CREDENTIALS_GO = ("put a credential in the URL's user part instead "
                         "(https://user:TOKEN@host/x.git, '@', ':', '?', '#' in it percent-encoded): "
                         "it is taken out and never recorded")


def _from_url(text: str, scheme: str) -> RepoUrl:
    parts = urlsplit(text)
    if "?" in text or "#" in text:  # Where tokens hide (`?access_token=…`); git needs neither.
        raise RepoUrlError(f"repo URL must not have a query (?…) or fragment (#…); {_WHERE_CREDENTIALS_GO}")
    userinfo, _, hostport = parts.netloc.rpartition("@")
    hostport = hostport.lower()  # As git's credential protocol will name it.
    if not _HOST.match(hostport) or hostport.startswith("-"):
        raise RepoUrlError("repo URL has an invalid host")
    if unquote(userinfo).startswith("-"):  # git decodes the URL: ssh would read `-o…` as an option.
        raise RepoUrlError("repo URL's user must not start with '-'")
    if scheme != "file" and not hostport.split(":")[0]:
        raise RepoUrlError(f"repo URL needs a host: {scheme}://host/path")
    if scheme == "file" and hostport not in ("", "localhost"):
        raise RepoUrlError("a file:// repo URL names a local path: file:///path/to/repo.git")
    clean = urlunsplit((parts.scheme, hostport, parts.path, "", ""))
    if not userinfo:
        return RepoUrl(clean, scheme)
    if scheme in ("http", "https"):
        return RepoUrl(clean, scheme, _credential(hostport, userinfo))
    if scheme == "ssh" and ":" not in userinfo:
        return RepoUrl(text, scheme)  # An ssh user name, not a secret: ssh authenticates by key.
    raise RepoUrlError(f"{scheme} repo URLs cannot carry a password; use an ssh key, "
                       f"or an https URL with the credential in it")


def _credential(host: str, userinfo: str) -> RepoCredential:
    username, _, password = userinfo.partition(":")
    username, password = unquote(username), unquote(password)
    if _CONTROL.search(username + password):
        raise RepoUrlError("the credential in the repo URL must not contain control characters")
    # A lone token (`https://TOKEN@host/…`) is presented as the user name, as git would.
    return RepoCredential(host=host, username=username, password=password)


def _from_scp(text: str) -> RepoUrl:
    if _SCP_PASSWORD.match(text):
        raise RepoUrlError("repo in scp form cannot carry a password (user:password@host:path); "
                           "use an ssh key, or an https URL with the credential in it")
    scp = _SCP.match(text)
    assert scp is not None
    user, host, path = scp.groups()
    if host.startswith("-") or (user or "").startswith("-"):
        raise RepoUrlError("repo host and user must not start with '-'")
    if not path or path.startswith(":"):
        raise RepoUrlError("repo in scp form needs a path: user@host:path/to/repo.git")
    return RepoUrl(text, "ssh")
