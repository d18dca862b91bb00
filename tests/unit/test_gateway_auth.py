"""The gateway's authentication middleware around a tiny app: token, cookie, Host and Origin rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket

from services.gateway.auth import ApiAuth, is_authenticated, session_cookie_name, session_value
from services.runtime.settings import Settings

TOKEN = "0123456789abcdef" * 4


def app(tmp_path: Path, **settings: object) -> TestClient:
    async def tasks(request: Request) -> JSONResponse:
        return JSONResponse({"tasks": []})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"full": is_authenticated(request)})

    async def page(request: Request) -> JSONResponse:
        return JSONResponse({"page": True})

    async def stream(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    inner = Starlette(routes=[Route("/api/tasks", tasks), Route("/api/health", health), Route("/", page),
                              WebSocketRoute("/api/stream", stream)])
    full = Settings(data_dir=tmp_path, api_token=TOKEN, port=8420, **settings)
    return TestClient(ApiAuth(inner, settings=full), base_url="http://127.0.0.1:8420")


BEARER = {"Authorization": f"Bearer {TOKEN}"}
STREAM = "ws://127.0.0.1:8420/api/stream"


def test_the_bearer_token_opens_the_api_and_anything_else_gets_a_401_saying_how(tmp_path):
    client = app(tmp_path)
    assert client.get("/api/tasks", headers=BEARER).status_code == 200
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        refused = client.get("/api/tasks", headers=headers)
        assert refused.status_code == 401 and "Authorization: Bearer" in refused.json()["detail"]
        assert refused.headers["www-authenticate"] == "Bearer"


def test_the_login_url_sets_a_cookie_that_is_not_the_token_and_opens_the_api(tmp_path):
    client = app(tmp_path)
    login = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/"
    assert client.cookies["baton_session_8420"] == session_value(TOKEN) != TOKEN
    assert client.get("/api/tasks").status_code == 200
    assert client.get("/api/health").json() == {"full": True}


def test_health_and_the_pages_are_open_but_health_knows_it_is_anonymous(tmp_path):
    client = app(tmp_path)
    assert client.get("/api/health").json() == {"full": False}
    assert client.get("/").status_code == 200


@pytest.mark.parametrize("host", ["localhost", "localhost:1", "127.0.0.1:8420", "[::1]:8420", "[::1]",
                                  "LOCALHOST.", "baton.example:443"])
def test_local_and_allowed_hosts_are_served(tmp_path, host):
    client = app(tmp_path, allowed_hosts="baton.example")
    assert client.get("/api/tasks", headers={**BEARER, "Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["attacker.example:8420", "127.0.0.1.attacker.example", "", "[::2]:8420",
                                  "localhost@evil", "127.0.0.1:18777@evil", "127.0.0.1:80:80",
                                  "localhost:http", "localhost, evil", "::1", "[::1]x", "127.0.0.1/x",
                                  "127.0.0.1:"])
def test_a_foreign_host_is_refused_naming_the_setting(tmp_path, host):
    refused = app(tmp_path).get("/api/tasks", headers={**BEARER, "Host": host})
    assert refused.status_code == 400 and "BATON_ALLOWED_HOSTS" in refused.json()["detail"]


def test_a_websocket_needs_the_token_and_the_pages_own_origin(tmp_path):
    client = app(tmp_path)
    with client.websocket_connect(STREAM, headers=BEARER) as socket:  # The CLI: no Origin.
        assert socket.receive_text() == "hello"
    own = {**BEARER, "Origin": "http://127.0.0.1:8420"}
    with client.websocket_connect(STREAM, headers=own) as socket:
        assert socket.receive_text() == "hello"
    for origin in ("http://evil.example", "http://127.0.0.1:8421", "https://127.0.0.1:8420", "null"):
        with pytest.raises(WebSocketDenialResponse) as refused, \
                client.websocket_connect(STREAM, headers={**BEARER, "Origin": origin}):
            pass
        assert refused.value.status_code == 403 and "origin" in refused.value.json()["detail"]
    with pytest.raises(WebSocketDenialResponse) as anonymous, client.websocket_connect(STREAM):
        pass
    assert anonymous.value.status_code == 401


def test_gateway_replicas_behind_a_load_balancer_take_one_session_cookie_named_after_its_port():
    # Alone, a gateway names its cookie after its own port (installs on one machine stay apart).
    assert session_cookie_name(Settings(port=8421)) == "baton_session_8421"
    # Behind a balancer (BATON_PUBLIC_URL), every replica, whatever its port, uses the balancer's.
    for port in (8420, 8421):
        assert session_cookie_name(Settings(port=port, public_url="http://baton.example:8000")) == "baton_session_8000"
    assert session_cookie_name(Settings(port=8421, public_url="https://baton.example")) == "baton_session_443"
