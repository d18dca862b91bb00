"""Repo URLs are checked, and a credential in one is taken out and kept only sealed."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from services.runtime.credentials import CredentialVault
from services.runtime.repo_url import RepoCredential, RepoUrlError, parse_repo_url

DEFAULT = frozenset({"https", "ssh", "file"})


@pytest.mark.parametrize(
    ("raw", "url", "scheme"),
    [
        ("https://github.com/o/r.git", "https://github.com/o/r.git", "https"),
        ("  https://github.com/o/r.git\n", "https://github.com/o/r.git", "https"),
        ("git@github.com:o/r.git", "git@github.com:o/r.git", "ssh"),
        ("ssh://git@host:2222/o/r.git", "ssh://git@host:2222/o/r.git", "ssh"),
        ("file:///srv/git/r.git", "file:///srv/git/r.git", "file"),
        ("/srv/git/r.git", "/srv/git/r.git", "file"),
        ("https://HOST.example/r.git", "https://host.example/r.git", "https"),
    ],
)
def test_allowed_repo_urls_are_kept_as_given(raw: str, url: str, scheme: str):
    repo = parse_repo_url(raw, allowed=DEFAULT)
    assert (repo.url, repo.scheme, repo.credential) == (url, scheme, None)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (" --upload-pack=touch /tmp/pwned", "must not start with '-'"),
        ("ext::sh -c touch% /tmp/pwned", "remote helper"),
        ("https::https://host/r.git", "remote helper"),
        ("file:///tmp/x\x00.git", "control characters"),
        ("https://host/r.git\nfetch", "control characters"),
        ("ftp://host/r.git", "'ftp' is not allowed"),
        ("http://host/r.git", "BATON_REPO_SCHEMES"),
        ("relative/path.git", "absolute path"),
        ("ssh://u:pw@host/r.git", "cannot carry a password"),
        ("https:///r.git", "needs a host"),
        ("user@-oProxyCommand:r.git", "must not start with '-'"),
        ("ssh://-oProxyCommand=touch%20x@host/r.git", "user must not start with '-'"),
        ("ssh://%2DoProxyCommand=x@host/r.git", "user must not start with '-'"),
        ("https://-u@host/r.git", "user must not start with '-'"),
        ("ssh://-host/r.git", "invalid host"),
    ],
)
def test_bad_repo_urls_are_refused_saying_what_to_change(raw: str, message: str):
    with pytest.raises(RepoUrlError, match=re.escape(message)):
        parse_repo_url(raw, allowed=DEFAULT)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("https://host/x.git?access_token=SEKRET", "must not have a query (?…) or fragment (#…)"),
        ("https://host/x.git#SEKRET", "must not have a query (?…) or fragment (#…)"),
        ("https://u:SEK#RET@host/x.git", "must not have a query (?…) or fragment (#…)"),
        ("https://u:SEK?RET@host/x.git", "must not have a query (?…) or fragment (#…)"),
        ("file:///srv/x.git?SEKRET", "must not have a query (?…) or fragment (#…)"),
        ("u:SEKRET@host:x.git", "scp form cannot carry a password"),
        ("u:SEKRET@[::1]:x.git", "scp form cannot carry a password"),
    ],
)
def test_a_credential_where_it_would_be_recorded_is_refused_without_repeating_it(raw: str, message: str):
    with pytest.raises(RepoUrlError, match=re.escape(message)) as refused:
        parse_repo_url(raw, allowed=DEFAULT)
    assert "SEK" not in str(refused.value)
    assert "user:TOKEN@host" in str(refused.value) or "ssh key" in str(refused.value)


def test_the_refusal_names_the_allowed_schemes_and_how_to_change_them():
    with pytest.raises(RepoUrlError) as refused:
        parse_repo_url("http://u:SEKRET@host/r.git", allowed=DEFAULT)
    assert "file, https, ssh" in str(refused.value) and "BATON_REPO_SCHEMES" in str(refused.value)
    assert "SEKRET" not in str(refused.value)


def test_http_is_allowed_when_configured():
    assert parse_repo_url("http://host/r.git", allowed={"http"}).scheme == "http"


def test_a_credential_is_taken_out_of_the_url():
    repo = parse_repo_url("https://alice:TO%40KEN@Host:8443/x.git", allowed=DEFAULT)
    assert repo.url == "https://host:8443/x.git"
    assert repo.credential == RepoCredential(host="host:8443", username="alice", password="TO@KEN")
    assert "TO@KEN" not in repr(repo)


def test_a_lone_token_is_taken_out_and_presented_as_the_user_name():
    repo = parse_repo_url("https://ghp_TOKEN@github.com/o/r.git", allowed=DEFAULT)
    assert repo.url == "https://github.com/o/r.git"
    assert repo.credential == RepoCredential(host="github.com", username="ghp_TOKEN", password="")


def test_an_ssh_user_name_is_not_a_secret_and_stays():
    assert parse_repo_url("ssh://git@host/r.git", allowed=DEFAULT).credential is None


def test_the_vault_keeps_a_credential_only_encrypted_in_a_private_file(tmp_path: Path):
    vault = CredentialVault(tmp_path / "credentials", "install-secret")
    credential = RepoCredential(host="host", username="alice", password="SEKRET")

    vault.seal("task1", credential)

    sealed = tmp_path / "credentials" / "task1"
    assert b"SEKRET" not in sealed.read_bytes() and b"alice" not in sealed.read_bytes()
    assert stat.S_IMODE(sealed.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "credentials").stat().st_mode) == 0o700
    assert vault.open("task1") == credential
    # Another install's secret, or another task's file, opens nothing.
    assert CredentialVault(tmp_path / "credentials", "other-secret").open("task1") is None
    (tmp_path / "credentials" / "task2").write_bytes(sealed.read_bytes())
    assert vault.open("task2") is None
    vault.discard("task1")
    assert vault.open("task1") is None and not sealed.exists()


def test_the_vault_refuses_a_path_for_a_task_id(tmp_path: Path):
    with pytest.raises(ValueError, match="not a task id"):
        CredentialVault(tmp_path, "s").open("../secret")
