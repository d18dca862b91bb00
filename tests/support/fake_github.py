"""A local GitHub: git smart-HTTP (`git http-backend`, tests.support.git_http) that takes only
`x-access-token:<token>` basic auth, as GitHub does for a token, and the REST endpoints Baton
calls under `/api/v3` (as an Enterprise server serves them), answering GitHub's shapes and its
error envelope `{"message", "errors", "documentation_url"}` (401 bad credentials, 404, 422).

REST: `GET /repos/{o}/{r}`, `GET /repos/{o}/{r}/pulls?head=o:branch&state=open`,
`POST /repos/{o}/{r}/pulls`, `GET|PATCH /repos/{o}/{r}/pulls/{n}`,
`GET /repos/{o}/{r}/compare/{base}...{head}` (files from the bare repo). Every REST request is
recorded (`requests`); `on_created` runs after a pull is created, before the answer is sent.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.git_http import GitHttpServer, _handler

API_PREFIX = "/api/v3"
DOCS = "https://docs.github.com/rest"


class ApiError(Exception):
    def __init__(self, status: int, message: str, errors: list[dict] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors or []

    def body(self) -> dict[str, Any]:
        body = {"message": self.message, "documentation_url": DOCS}
        if self.errors:
            body["errors"] = self.errors
        return body


@dataclass
class FakeGitHub:
    root: Path
    token: str
    port: int = 0
    pulls: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, dict | None]] = field(default_factory=list)
    refuse_create: tuple[int, str, list[dict]] | None = None
    """Answer every POST /pulls with this (status, message, errors)."""
    on_created: Callable[[dict[str, Any]], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    git: GitHttpServer | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    def repo_url(self, owner: str, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{owner}/{name}.git"

    def calls(self, method: str, pattern: str) -> list[tuple[str, str, dict | None]]:
        return [r for r in self.requests if r[0] == method and re.search(pattern, r[1])]

    # --- REST ---
    def handle(self, method: str, path: str, query: dict[str, list[str]], body: dict | None, auth: str) -> tuple[int, Any]:
        with self.lock:
            self.requests.append((method, path, body))
            if auth not in (f"Bearer {self.token}", f"token {self.token}"):
                raise ApiError(401, "Bad credentials")
            repo = re.match(r"^/repos/([^/]+)/([^/]+)(/.*)?$", path)
            if repo is None or not (self.root / repo[1] / f"{repo[2]}.git").is_dir():
                raise ApiError(404, "Not Found")
            owner, name, rest = repo[1], repo[2], repo[3] or ""
            return self._route(method, owner, name, rest, query, body or {})

    def _route(self, method: str, owner: str, name: str, rest: str, query: dict, body: dict) -> tuple[int, Any]:
        if method == "GET" and rest == "":
            return 200, {"full_name": f"{owner}/{name}", "default_branch": "main", "private": True}
        if method == "GET" and rest == "/pulls":
            head = query.get("head", [""])[0]
            return 200, [p for p in self.pulls if p["state"] == "open" and (not head or p["head"]["label"] == head)]
        if method == "POST" and rest == "/pulls":
            return 201, self._create(owner, name, body)
        if (pull := re.match(r"^/pulls/(\d+)$", rest)) is not None:
            found = next((p for p in self.pulls if p["number"] == int(pull[1])), None)
            if found is None:
                raise ApiError(404, "Not Found")
            if method == "PATCH":
                found.update({k: v for k, v in body.items() if k in ("title", "body", "state", "base")})
            return 200, found
        if method == "GET" and (compare := re.match(r"^/compare/(.+)\.\.\.(.+)$", rest)) is not None:
            names = self._git(owner, name, "diff", "--name-only", f"{compare[1]}...{compare[2]}").split()
            return 200, {"status": "ahead", "files": [{"filename": n, "status": "modified"} for n in names]}
        raise ApiError(404, "Not Found")

    def _create(self, owner: str, name: str, body: dict) -> dict[str, Any]:
        if self.refuse_create is not None:
            raise ApiError(*self.refuse_create)
        head, base = body.get("head", ""), body.get("base", "")
        if not self._git(owner, name, "rev-parse", "--verify", "--quiet", f"refs/heads/{head}"):
            raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "field": "head", "code": "invalid"}])
        label = f"{owner}:{head}"
        if any(p["head"]["label"] == label and p["base"]["ref"] == base and p["state"] == "open" for p in self.pulls):
            raise ApiError(422, "Validation Failed", [{"resource": "PullRequest", "code": "custom",
                                                       "message": f"A pull request already exists for {label}."}])
        number = len(self.pulls) + 1
        pull = {"number": number, "state": "open", "title": body.get("title", ""), "body": body.get("body", ""),
                "draft": bool(body.get("draft", False)),
                "html_url": f"http://127.0.0.1:{self.port}/{owner}/{name}/pull/{number}",
                "url": f"{self.api_url}/repos/{owner}/{name}/pulls/{number}",
                "head": {"ref": head, "label": label}, "base": {"ref": base, "label": f"{owner}:{base}"}}
        self.pulls.append(pull)
        if self.on_created is not None:
            self.on_created(pull)
        return pull

    def _git(self, owner: str, name: str, *args: str) -> str:
        done = subprocess.run(["git", "--git-dir", str(self.root / owner / f"{name}.git"), *args],
                              capture_output=True, text=True)
        return done.stdout.strip()


def _github_handler(github: FakeGitHub, git: GitHttpServer):
    base = _handler(git)

    class Handler(base):  # type: ignore[misc, valid-type]
        def do_GET(self) -> None:
            self._either()

        def do_POST(self) -> None:
            self._either()

        def do_PATCH(self) -> None:
            self._either()

        def _either(self) -> None:
            if not self.path.startswith(API_PREFIX + "/"):
                self._serve()  # git smart-HTTP, x-access-token basic auth
                return
            target = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                status, answer = github.handle(self.command, target.path.removeprefix(API_PREFIX),
                                               parse_qs(target.query), json.loads(raw) if raw else None,
                                               self.headers.get("Authorization", ""))
            except ApiError as error:
                status, answer = error.status, error.body()
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@contextmanager
def fake_github(root: Path, *, token: str) -> Iterator[FakeGitHub]:
    """GitHub on http://127.0.0.1:<port>: the bare repos under `root/<owner>/<name>.git`."""
    github = FakeGitHub(root, token)
    git = GitHttpServer(root, "x-access-token", token)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _github_handler(github, git))
    github.port = git.port = httpd.server_address[1]
    github.git = git
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield github
    finally:
        httpd.shutdown()
        httpd.server_close()
