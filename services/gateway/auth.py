"""Who may use the gateway: the owner, from this machine (or an allowed host), over HTTP and WebSocket.

Every request needs the API token, as `Authorization: Bearer <token>` (the CLI, scripts) or as the
session cookie that the login URL `/?token=<token>` sets for the browser (HttpOnly, SameSite=Strict;
its value is an HMAC of the token, never the token). Without either: 401 saying how to authenticate.
The web UI's pages and assets load without it (they hold no data); `/api/health` answers only its
status; `/api/vm-agent/dist/` checks a cloud workspace's own credential instead. The Host header
must name this machine or one of BATON_ALLOWED_HOSTS (DNS rebinding), and a browser's WebSocket
must come from the page's own origin (another site's page cannot read the streams).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from urllib.parse import parse_qsl, urlsplit

from starlette.datastructures import Headers
from starlette.requests import HTTPConnection, cookie_parser
from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services.runtime.settings import Settings

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
AUTHENTICATED = "baton.authenticated"
"""The scope key that says whether this request carried the token (for routes open to anyone)."""
SESSION_MAX_AGE_S = 24 * 3600
"""A browser's login lasts a day. Browsers send a 127.0.0.1 cookie to every port of 127.0.0.1, so
any local server the user opens could see it: the shorter it lives, the less such a copy is worth."""
HOW_TO_AUTHENTICATE = (
    "authentication required: send `Authorization: Bearer <token>` (the token is in the data dir's "
    "`api-token` file, or BATON_API_TOKEN), or open the login URL that `baton up` printed "
    "(http://127.0.0.1:<port>/?token=...) in this browser"
)
# The web UI's pages and assets: open, since they are the same static files for everyone.
_PUBLIC_PATH = re.compile(r"^/(|tasks/[^/]+/?|static/[^/]+|favicon\.ico)$")
_HEALTH_PATH = "/api/health"
# A cloud VM fetches its vm_agent here with its workspace's own expiring credential (never the API
# token); the route checks that credential itself. The VMs reach the gateway by a name that must be
# in BATON_ALLOWED_HOSTS (the Host check still applies).
_VM_AGENT_DIST_PREFIX = "/api/vm-agent/dist/"
# GitHub cannot send the API token: the hook verifies its delivery's signature itself.
_GITHUB_HOOK_PATH = "/api/hooks/github"
# A Host header: a name or an IPv4 address, or a bracketed IPv6 address; then an optional port.
_HOST_HEADER = re.compile(r"^(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::[0-9]{1,5})?$")


def is_authenticated(connection: HTTPConnection) -> bool:
    """Whether the request carried the API token (routes open to anyone say less without it)."""
    return bool(connection.scope.get(AUTHENTICATED, False))


def session_value(token: str) -> str:
    """The session cookie's value: derived from the token, so the cookie never holds the token."""
    return hmac.new(token.encode(), b"baton web session", hashlib.sha256).hexdigest()


def session_cookie_name(settings: Settings) -> str:
    """Cookies are per host, not per port: each install on this machine gets its own name, after
    the port people open it on: BATON_PUBLIC_URL's when set (a load balancer in front of gateway
    replicas on other ports: each takes the same session), else this gateway's."""
    public = urlsplit(settings.public_url) if settings.public_url else None
    port = (public.port or (443 if public.scheme == "https" else 80)) if public else settings.port
    return f"baton_session_{port}"


class ApiAuth:
    """Pure ASGI middleware: checks Host, Origin (WebSocket) and the token before any route runs."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.token = settings.api_token_value().encode()
        self.session = session_value(settings.api_token_value()).encode()
        self.cookie = session_cookie_name(settings)
        self.hosts = LOCAL_HOSTS | {_bare_host(host) for host in settings.allowed_hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if _host_of_header(host) not in self.hosts:
            await refuse(scope, receive, send, 400, (
                f"this Baton does not answer to Host {host!r}: use localhost, 127.0.0.1 or [::1], "
                "or add the name to BATON_ALLOWED_HOSTS"))
            return
        origin = headers.get("origin")
        if scope["type"] == "websocket" and origin is not None and not _same_origin(origin, host, scope):
            await refuse(scope, receive, send, 403, (
                f"a WebSocket from origin {origin!r} is refused: only the Baton UI's own pages "
                "(or clients without an Origin, such as the CLI) may open the streams"))
            return
        scope[AUTHENTICATED] = self._carries_token(headers)
        login = _login_token(scope)
        if login is not None:
            await self._login(scope, receive, send, login)
        elif scope[AUTHENTICATED] or scope["path"] == _HEALTH_PATH or _PUBLIC_PATH.match(scope["path"]) \
                or (scope["type"] == "http" and scope["path"].startswith(_VM_AGENT_DIST_PREFIX)) \
                or (scope["type"] == "http" and scope["path"] == _GITHUB_HOOK_PATH):
            await self.app(scope, receive, send)
        else:
            await refuse(scope, receive, send, 401, HOW_TO_AUTHENTICATE, {"WWW-Authenticate": "Bearer"})

    def _carries_token(self, headers: Headers) -> bool:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials:
            return hmac.compare_digest(credentials.strip().encode(), self.token)
        session = cookie_parser(headers.get("cookie", "")).get(self.cookie)
        return session is not None and hmac.compare_digest(session.encode(), self.session)

    async def _login(self, scope: Scope, receive: Receive, send: Send, token: str) -> None:
        """`GET <page>?token=…`: set the session cookie and go to the page without the token in the URL."""
        if not hmac.compare_digest(token.encode(), self.token):
            await refuse(scope, receive, send, 401, (
                "this login URL's token is not this Baton's: open the login URL that `baton up` "
                "printed, or read the token from the data dir's `api-token` file"))
            return
        response = RedirectResponse(scope["path"], status_code=303, headers={"Cache-Control": "no-store"})
        response.set_cookie(self.cookie, self.session.decode(), max_age=SESSION_MAX_AGE_S, path="/",
                            httponly=True, samesite="strict", secure=scope["scheme"] == "https")
        await response(scope, receive, send)


async def refuse(scope: Scope, receive: Receive, send: Send, status: int, detail: str,
                 headers: dict[str, str] | None = None) -> None:
    """Answer `{"detail": …}` with `status`; a WebSocket is refused before it is accepted (an HTTP
    answer where the server can send one, else a close with 1008 and the reason)."""
    response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    if scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
            return
    await response(scope, receive, send)


class DenialLogFilter(logging.Filter):
    """Drops uvicorn's spurious ERROR after each WebSocket refused with an HTTP answer: its
    websockets-sansio protocol never marks that handshake complete (Kludex/uvicorn PR #3138)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


def _host_of_header(header: str) -> str | None:
    """The host a Host header names, as `_bare_host` gives it; None unless the header is exactly
    `host[:port]` (so `127.0.0.1:1@evil` or `localhost, evil` name no host)."""
    header = header.strip().lower()
    return _bare_host(header) if _HOST_HEADER.match(header) else None


def _bare_host(host: str) -> str:
    """`Host` without its port and brackets, lower case: `[::1]:8420` → `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") > 1:  # A bare IPv6 address (a setting, not a Host header).
        return host
    return host.partition(":")[0].rstrip(".")


def _same_origin(origin: str, host: str, scope: Scope) -> bool:
    """Whether `Origin` is the page's own: the scheme this request came in on and the Host's host:port."""
    page_scheme = "https" if scope["scheme"] in ("wss", "https") else "http"
    try:
        parts = urlsplit(origin)
        page = urlsplit(f"{page_scheme}://{host}")
        return (parts.scheme, parts.hostname, _port(parts)) == (page_scheme, page.hostname, _port(page))
    except ValueError:  # `null`, a malformed port: not the page's origin.
        return False


def _port(url) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _login_token(scope: Scope) -> str | None:
    """The `token` query parameter of a GET on a web UI page (the login URL), if any."""
    if scope["type"] != "http" or scope["method"] != "GET" or not _PUBLIC_PATH.match(scope["path"]):
        return None
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
    return next((value for name, value in query if name == "token"), None)
