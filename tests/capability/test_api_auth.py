"""Only the owner may use the API: a token or the login URL's cookie, a local Host, the page's own Origin."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import websockets

from tests.support.api import Api
from tests.support.processes import BatonStack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

PROTECTED = [("POST", "/api/tasks"), ("GET", "/api/tasks"), ("GET", "/api/tasks/0123456789abcdef"),
             ("GET", "/api/tasks/0123456789abcdef/events"), ("GET", "/api/backends"),
             ("GET", "/api/audit/events"), ("GET", "/docs"), ("GET", "/openapi.json"),
             ("POST", "/api/tasks/0123456789abcdef/cancel"), ("POST", "/api/tasks/0123456789abcdef/messages"),
             ("GET", "/api/tasks/0123456789abcdef/permissions"),
             ("POST", "/api/tasks/0123456789abcdef/permissions/r1"),
             ("GET", "/metrics"), ("GET", "/api/notifications"), ("GET", "/api/events/asyncapi.json")]
STREAMS = ["/api/stream", "/api/tasks/0123456789abcdef/stream"]
A_TASK = {"repo": "file:///nowhere.git", "prompt": "echo hi", "agent": "shell"}


def board_size(api: Api) -> int:
    return len(api.http.get("/api/tasks").json()["tasks"])


def handshake(stack: BatonStack, path: str, *, host: str | None = None, **options) -> tuple[int, str]:
    """Open a WebSocket to the stack (saying `Host: host`): 101 if accepted, else the refusal's
    HTTP status and body."""
    url = f"ws://{host or f'127.0.0.1:{stack.port}'}{path}"

    async def attempt() -> tuple[int, str]:
        try:
            async with websockets.connect(url, host="127.0.0.1", port=stack.port, open_timeout=10, **options):
                return 101, ""
        except websockets.InvalidStatus as refused:
            return refused.response.status_code, refused.response.body.decode(errors="replace")

    return asyncio.run(attempt())


@contextmanager
def logged_in(stack: BatonStack) -> Iterator[httpx.Client]:
    """A client that opened the login URL, as a browser does: it holds the session cookie."""
    with httpx.Client(base_url=stack.api, timeout=10) as client:
        response = client.get(f"/?token={stack.token}")
        assert response.status_code == 303 and response.headers["location"] == "/", response.text
        yield client


@pytest.mark.parametrize("credentials", [{}, {"Authorization": "Bearer not-the-token"},
                                         {"Cookie": "baton_session_{port}=forged"}],
                         ids=["no-token", "wrong-token", "forged-cookie"])
def test_without_the_token_every_route_and_stream_says_401_and_how_to_authenticate(
        stack: BatonStack, api: Api, credentials: dict):
    credentials = {name: value.format(port=stack.port) for name, value in credentials.items()}
    before = board_size(api)
    for method, path in PROTECTED:
        response = httpx.request(method, f"{stack.api}{path}", headers=credentials, json=A_TASK, timeout=10)
        assert response.status_code == 401, (method, path, response.text)
        assert "Authorization: Bearer" in response.json()["detail"], response.text
        assert "login URL" in response.json()["detail"]
    for path in STREAMS:
        status, detail = handshake(stack, path, additional_headers=credentials)
        assert status == 401 and "Authorization: Bearer" in detail, (path, status, detail)
    # The refused POST recorded nothing.
    assert board_size(api) == before


def test_health_says_only_its_status_without_the_token(stack: BatonStack, api: Api):
    anonymous = httpx.get(f"{stack.api}/api/health", timeout=10)
    assert anonymous.status_code == 200
    assert anonymous.json() == {"status": "ok"}

    full = api.http.get("/api/health").json()
    assert full["status"] == "ok" and full["services"]["gateway"] is True and "nats" in full


@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LocalHost:{port}",
                                  "localhost"])
def test_local_host_names_with_the_token_are_served(stack: BatonStack, host: str):
    host = host.format(port=stack.port)

    response = httpx.get(f"{stack.api}/api/tasks", headers={**stack.auth, "Host": host}, timeout=10)

    assert response.status_code == 200, response.text
    # A WebSocket from the page's own origin (the same host and port) is served too.
    status, detail = handshake(stack, "/api/stream?exclude=AgentOutput", host=host, origin=f"http://{host}",
                               additional_headers=stack.auth)
    assert status == 101, detail


def test_a_foreign_host_is_refused_even_with_the_token_and_records_nothing(stack: BatonStack, api: Api):
    # DNS rebinding: a page of attacker.example whose name now points at 127.0.0.1.
    before = board_size(api)
    rebound = {**stack.auth, "Host": f"attacker.example:{stack.port}"}

    response = httpx.post(f"{stack.api}/api/tasks", json=A_TASK, headers=rebound, timeout=10)

    assert response.status_code == 400
    assert "BATON_ALLOWED_HOSTS" in response.json()["detail"]
    status, detail = handshake(stack, "/api/stream", host=f"attacker.example:{stack.port}",
                               additional_headers=stack.auth)
    assert status == 400 and "BATON_ALLOWED_HOSTS" in detail
    assert httpx.get(f"{stack.api}/?token={stack.token}", headers=rebound, timeout=10).status_code == 400
    assert board_size(api) == before


def test_the_login_url_sets_a_strict_httponly_cookie_without_the_token_and_drops_it_from_the_url(
        stack: BatonStack):
    with httpx.Client(base_url=stack.api, timeout=10) as browser:
        login = browser.get(f"/tasks/0123456789abcdef?token={stack.token}")

        # Redirected to the same page, the token gone from the URL.
        assert login.status_code == 303
        assert login.headers["location"] == "/tasks/0123456789abcdef"
        cookie = login.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert stack.token not in cookie
        # With the cookie the API and its docs answer.
        assert browser.get("/api/tasks").status_code == 200
        assert browser.get("/docs").status_code == 200
        assert "services" in browser.get("/api/health").json()

    wrong = httpx.get(f"{stack.api}/?token=not-the-token", timeout=10)
    assert wrong.status_code == 401 and "login URL" in wrong.json()["detail"]


def test_baton_up_prints_the_login_url_and_opening_it_logs_the_browser_in(stack: BatonStack):
    # Printed once the stack is healthy (a moment after /api/health first answers 200).
    printed = wait_for(lambda: re.findall(r"Open the web UI \(this URL logs you in\): (\S+)",
                                          stack.log_path.read_text()), timeout_s=30, what="the login URL")
    assert printed[-1] == f"{stack.api}/?token={stack.token}", printed
    with httpx.Client(timeout=10) as browser:
        assert browser.get(f"{stack.api}/api/tasks").status_code == 401
        assert browser.get(printed[-1]).status_code == 303
        assert browser.get(f"{stack.api}/api/tasks").status_code == 200
    # The token is created once, readable by its owner alone.
    assert (stack.data_dir / "api-token").stat().st_mode & 0o777 == 0o600


def test_the_pages_and_assets_load_without_the_token_but_hold_no_data(stack: BatonStack):
    for path in ("/", "/tasks/0123456789abcdef", "/static/app.js"):
        assert httpx.get(f"{stack.api}{path}", timeout=10).status_code == 200, path


def test_a_websocket_from_another_site_is_refused_even_with_the_cookie(stack: BatonStack):
    with logged_in(stack) as browser:
        cookie = "; ".join(f"{name}={value}" for name, value in browser.cookies.items())
    same_page = f"http://127.0.0.1:{stack.port}"

    for origin in ("http://evil.example", f"http://127.0.0.1:{stack.port + 1}", f"https://127.0.0.1:{stack.port}"):
        status, detail = handshake(stack, "/api/stream", origin=origin, additional_headers={"Cookie": cookie})
        assert status == 403 and "origin" in detail, (origin, status, detail)
    # The page's own origin with the cookie is the browser UI: served.
    status, detail = handshake(stack, "/api/stream?exclude=AgentOutput", origin=same_page,
                               additional_headers={"Cookie": cookie})
    assert status == 101, detail


def baton(stack: BatonStack, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("BATON_API_TOKEN", "BATON_DATA_DIR")}
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args],
                          env={**base, "BATON_API": stack.api, "COLUMNS": "200", **env},
                          capture_output=True, text=True, timeout=120)


def test_the_cli_reads_the_token_from_the_environment_or_the_data_dir(
        stack: BatonStack, origin: Path, tmp_path: Path):
    empty = str(tmp_path / "no-baton-here")

    # BATON_API_TOKEN: a task submitted and followed over the stream to its end.
    done = baton(stack, "submit", "--repo", origin.as_uri(), "echo hi",
                 env={"BATON_API_TOKEN": stack.token, "BATON_DATA_DIR": empty})
    assert done.returncode == 0, done.stdout + done.stderr
    task_id = done.stdout.split("task ", 1)[1].split()[0]
    # The data dir's `api-token` file, as `baton up` wrote it.
    board = baton(stack, "tasks", env={"BATON_DATA_DIR": str(stack.data_dir)})
    assert board.returncode == 0 and task_id in board.stdout, board.stdout + board.stderr
    # --token wins over both.
    assert baton(stack, "events", task_id, "--token", stack.token, env={"BATON_DATA_DIR": empty}).returncode == 0


def test_the_cli_says_in_one_line_where_it_looked_for_a_token(stack: BatonStack, tmp_path: Path):
    empty = tmp_path / "no-baton-here"

    missing = baton(stack, "tasks", env={"BATON_DATA_DIR": str(empty)})
    refused = baton(stack, "submit", "--repo", "file:///x.git", "echo hi",
                    env={"BATON_API_TOKEN": "not-the-token"})

    assert missing.returncode == 2
    assert str(empty / "api-token") in missing.stdout and "BATON_API_TOKEN" in missing.stdout
    assert refused.returncode == 2
    assert "refused the token from BATON_API_TOKEN" in refused.stdout
    for done in (missing, refused):
        assert "Traceback" not in done.stdout + done.stderr


def test_no_service_log_holds_the_token(stack: BatonStack, api: Api):
    # Requests that carry it every way: header, login URL, cookie.
    api.http.get("/api/tasks")
    with logged_in(stack) as browser:
        browser.get("/api/tasks")
    httpx.get(f"{stack.api}/?token=wrong-{stack.token}", timeout=10)

    logs = sorted((stack.data_dir / "logs").rglob("*"))
    assert logs, "no service logs found"
    for path in logs:
        if path.is_file():
            assert stack.token not in path.read_text(errors="replace"), path
