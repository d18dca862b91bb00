"""GitHub as Baton uses it: which repos the configured token is for, and the REST calls on pulls.

One token per install for the API's host (BATON_GITHUB_TOKEN, BATON_GITHUB_API_URL): github.com
for the public API, the API URL's own host for Enterprise (`https://HOST/api/v3`). A repo URL is
GitHub's when it is `SCHEME://HOST/OWNER/REPO[.git]` on that host with the API's scheme (so plain
`http` only for an API configured on `http`, as a local test server is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from services.runtime.agent_secrets import AgentSecrets
from services.runtime.repo_url import RepoCredential
from services.runtime.settings import Settings

PUBLIC_API = "https://api.github.com"
TOKEN_USERNAME = "x-access-token"
"""The user name GitHub takes with a token over HTTPS (what its own apps and Actions use)."""


@dataclass(frozen=True)
class GitHubRepo:
    owner: str
    name: str

    @property
    def path(self) -> str:
        return f"/repos/{self.owner}/{self.name}"


@dataclass(frozen=True)
class GitHubHost:
    """The host the token is for, as git's credential protocol names it (`host[:port]`)."""

    host: str
    scheme: str
    api_url: str

    @classmethod
    def of(cls, settings: Settings) -> GitHubHost | None:
        """The configured GitHub host, or None without a token."""
        if not github_token(settings):
            return None
        api = urlsplit(settings.github_api_url.rstrip("/"))
        host = "github.com" if settings.github_api_url.rstrip("/") == PUBLIC_API else api.netloc.lower()
        return cls(host=host, scheme=api.scheme, api_url=settings.github_api_url.rstrip("/"))

    def repo_of(self, repo_url: str) -> GitHubRepo | None:
        """The `owner/name` of `repo_url` (a recorded, credential-free URL) if it is on this host."""
        parts = urlsplit(repo_url)
        if parts.scheme != self.scheme or parts.netloc.lower() != self.host:
            return None
        segments = [s for s in parts.path.split("/") if s]
        if len(segments) != 2:
            return None
        owner, name = segments[0], segments[1].removesuffix(".git")
        return GitHubRepo(owner, name) if owner and name else None


def token_credential(settings: Settings, repo_url: str) -> RepoCredential | None:
    """The credential git presents for a GitHub repo (the token as `x-access-token`), or None
    for a repo not on the configured host (or no token)."""
    host = GitHubHost.of(settings)
    if host is None or host.repo_of(repo_url) is None:
        return None
    token = github_token(settings)
    assert token is not None
    return RepoCredential(host=host.host, username=TOKEN_USERNAME, password=token)


def github_token(settings: Settings) -> str | None:
    """The install's GitHub token: BATON_GITHUB_TOKEN, else the one kept with `baton secrets set GITHUB_TOKEN`."""
    return settings.github_token or AgentSecrets.of(settings).get("GITHUB_TOKEN")


class GitHubError(RuntimeError):
    """The API refused: `status` and GitHub's own `message` (and its `errors`' messages)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"GitHub API {status}: {message}")
        self.status, self.message = status, message

    @property
    def pull_exists(self) -> bool:
        """GitHub's 422 for a second pull request of the same head and base."""
        return self.status == 422 and "already exists" in self.message


class GitHubClient:
    """The REST calls on one repo's pulls (an httpx client; the token only in its headers)."""

    def __init__(self, api_url: str, token: str, *, timeout_s: float = 30.0) -> None:
        self._http = httpx.AsyncClient(base_url=api_url, timeout=timeout_s, headers={
            "Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28", "User-Agent": "baton"})

    async def aclose(self) -> None:
        await self._http.aclose()

    async def default_branch(self, repo: GitHubRepo) -> str:
        return (await self._call("GET", repo.path))["default_branch"]

    async def open_pull_for(self, repo: GitHubRepo, branch: str) -> dict[str, Any] | None:
        """The open pull request whose head is `branch` of this repo, or None."""
        pulls = await self._call("GET", f"{repo.path}/pulls",
                                 params={"head": f"{repo.owner}:{branch}", "state": "open"})
        return pulls[0] if pulls else None

    async def head_ref(self, repo: GitHubRepo, number: int) -> str:
        """The branch pull request `number` is from."""
        return (await self._call("GET", f"{repo.path}/pulls/{number}"))["head"]["ref"]

    async def create_pull(self, repo: GitHubRepo, **body: Any) -> dict[str, Any]:
        return await self._call("POST", f"{repo.path}/pulls", json=body)

    async def update_pull(self, repo: GitHubRepo, number: int, **body: Any) -> dict[str, Any]:
        return await self._call("PATCH", f"{repo.path}/pulls/{number}", json=body)

    async def files_changed(self, repo: GitHubRepo, base: str, head: str) -> list[str]:
        compared = await self._call("GET", f"{repo.path}/compare/{base}...{head}")
        return [entry["filename"] for entry in compared.get("files", [])]

    async def _call(self, method: str, path: str, **options: Any) -> Any:
        try:
            response = await self._http.request(method, path, **options)
        except httpx.HTTPError as error:
            raise GitHubError(0, f"cannot reach the API: {type(error).__name__}") from None
        if response.is_success:
            return response.json()
        raise GitHubError(response.status_code, _message_of(response))


def _message_of(response: httpx.Response) -> str:
    """GitHub's error envelope `{"message", "errors": [{"message"|"code"}], ...}` as one line."""
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or "no message"
    details = [e.get("message") or e.get("code", "") for e in body.get("errors", []) if isinstance(e, dict)]
    return "; ".join(filter(None, [body.get("message", ""), *details])) or "no message"
