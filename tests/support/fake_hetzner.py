"""A local Hetzner Cloud API (the `/v1` paths, JSON shapes and errors the real one answers), driven
by the real `hcloud` client, whose "servers" boot by running their user_data in a network namespace.

What it speaks: `GET/POST /v1/servers` (label_selector, name, page/per_page with `meta.pagination`),
`GET/DELETE /v1/servers/{id}`, `GET /v1/actions/{id}` (running, then success: polled to completion),
`GET /v1/server_types` (with `prices` per location), `/v1/locations`, `/v1/images`; Bearer auth
(`unauthorized`, 401), `RateLimit-*` headers and `rate_limit_exceeded` (429) on demand, and
`resource_unavailable` (412) for the locations configured as full. Errors use the real envelope
`{"error": {"code", "message", "details"}}`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

LOCATIONS = ("fsn1", "nbg1", "hel1")
SERVER_TYPES = {"cx22": (1, "0.0060"), "cx32": (2, "0.0113")}
"""name -> (id, net hourly EUR in every location)."""
IMAGES = {"ubuntu-24.04": 161547269}
RATE_LIMIT = 3600


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class FakeHetznerState:
    """What the fake holds and how a test configures it (thread-safe through `lock`)."""

    token: str
    unavailable_locations: set[str] = field(default_factory=set)
    rate_limited_requests: int = 0
    """The next N requests are answered 429 `rate_limit_exceeded`."""
    action_polls: int = 1
    """An action reads `running` this many times before `success`."""
    boot: Callable[[dict[str, Any]], None] | None = None
    """Called (in a thread) with a server once its create action finished: runs its user_data."""
    halt: Callable[[dict[str, Any]], None] | None = None
    """Called with a server that is deleted: stops what `boot` started."""
    servers: dict[int, dict[str, Any]] = field(default_factory=dict)
    actions: dict[int, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    deleted: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _next_id: int = 1000

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id


def server_type_json(name: str) -> dict[str, Any]:
    type_id, hourly = SERVER_TYPES[name]
    gross = f"{float(hourly) * 1.19:.4f}"
    return {
        "id": type_id, "name": name, "description": name.upper(), "cores": 2 * type_id, "memory": 4.0 * type_id,
        "disk": 40 * type_id, "deprecated": False, "storage_type": "local", "cpu_type": "shared",
        "architecture": "x86", "category": "cost_optimized",
        "prices": [
            {"location": loc, "price_hourly": {"net": hourly, "gross": gross},
             "price_monthly": {"net": f"{float(hourly) * 730:.4f}", "gross": f"{float(gross) * 730:.4f}"},
             "included_traffic": 21990232555520, "price_per_tb_traffic": {"net": "1.0000", "gross": "1.1900"}}
            for loc in LOCATIONS
        ],
    }


def location_json(name: str) -> dict[str, Any]:
    return {"id": LOCATIONS.index(name) + 1, "name": name, "description": name, "country": "DE",
            "city": name, "latitude": 50.0, "longitude": 12.0, "network_zone": "eu-central"}


def image_json(name: str) -> dict[str, Any]:
    return {"id": IMAGES[name], "type": "system", "status": "available", "name": name, "description": name,
            "os_flavor": "ubuntu", "os_version": name.split("-")[1], "architecture": "x86",
            "rapid_deploy": True, "labels": {}, "protection": {"delete": False}, "deprecated": None,
            "created": "2024-04-25T00:00:00+00:00", "deleted": None, "disk_size": 5, "image_size": None,
            "bound_to": None, "created_from": None}


def _name_of(value: object, names_by_id: dict[int, str]) -> object:
    return names_by_id.get(value, value) if isinstance(value, int) else value


def matches_selector(labels: dict[str, str], selector: str) -> bool:
    """Hetzner's label selector: `k=v`, `k!=v`, `k`, `!k`, comma-joined (all must hold)."""
    for term in filter(None, (part.strip() for part in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            ok = labels.get(key) != value
        elif "=" in term:
            key, value = term.split("=", 1)
            ok = labels.get(key.rstrip("=")) == value
        elif term.startswith("!"):
            ok = term[1:] not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


class FakeHetznerApi:
    """The API's behaviour on the state, one method per route (no HTTP here)."""

    def __init__(self, state: FakeHetznerState) -> None:
        self.state = state

    def list_servers(self, query: dict[str, str]) -> dict[str, Any]:
        found = [s for s in sorted(self.state.servers.values(), key=lambda s: s["id"])
                 if matches_selector(s["labels"], query.get("label_selector", ""))
                 and query.get("name", s["name"]) == s["name"]]
        page, per_page = int(query.get("page", 1)), min(int(query.get("per_page", 25)), 50)
        last = max(1, -(-len(found) // per_page))
        pagination = {"page": page, "per_page": per_page, "previous_page": page - 1 if page > 1 else None,
                      "next_page": page + 1 if page < last else None, "last_page": last,
                      "total_entries": len(found)}
        return {"servers": found[(page - 1) * per_page: page * per_page], "meta": {"pagination": pagination}}

    def create_server(self, body: dict[str, Any]) -> dict[str, Any]:
        # The API takes an id or a name for each (hcloud sends the id of a bound object).
        name = body.get("name")
        type_name = _name_of(body.get("server_type"), {v[0]: k for k, v in SERVER_TYPES.items()})
        image = _name_of(body.get("image"), {v: k for k, v in IMAGES.items()})
        location = _name_of(body.get("location") or LOCATIONS[0], {i + 1: n for i, n in enumerate(LOCATIONS)})
        if not name or type_name not in SERVER_TYPES or image not in IMAGES or location not in LOCATIONS:
            raise ApiError(400, "invalid_input", "invalid input in fields 'name', 'server_type', 'image' or 'location'")
        if any(s["name"] == name for s in self.state.servers.values()):
            raise ApiError(409, "uniqueness_error", "server name is already used")
        if location in self.state.unavailable_locations:
            raise ApiError(412, "resource_unavailable",
                           f"server type {type_name} is unavailable in {location}")
        server_id = self.state.next_id()
        server = {
            "id": server_id, "name": name, "status": "initializing", "created": _now(),
            "labels": dict(body.get("labels") or {}), "server_type": server_type_json(type_name),
            "location": location_json(location), "image": image_json(image),
            "public_net": {"ipv4": {"id": server_id, "ip": f"203.0.113.{server_id % 250}", "blocked": False,
                                    "dns_ptr": "static.example"},
                           "ipv6": None, "floating_ips": [], "firewalls": []},
            "private_net": [], "volumes": [], "iso": None, "rescue_enabled": False, "locked": False,
            "backup_window": None, "outgoing_traffic": 0, "ingoing_traffic": 0, "included_traffic": 0,
            "protection": {"delete": False, "rebuild": False}, "primary_disk_size": 40, "placement_group": None,
            "load_balancers": [], "user_data": body.get("user_data"),
        }
        self.state.servers[server_id] = server
        action = self._action("create_server", server_id, on_success=lambda: self._started(server))
        public = {k: v for k, v in server.items() if k != "user_data"}
        return {"server": public, "action": action, "next_actions": [], "root_password": None}

    def _started(self, server: dict[str, Any]) -> None:
        server["status"] = "running"
        if self.state.boot is not None:
            threading.Thread(target=self.state.boot, args=(server,), daemon=True).start()

    def get_server(self, server_id: int) -> dict[str, Any]:
        server = self.state.servers.get(server_id)
        if server is None:
            raise ApiError(404, "not_found", f"server with ID '{server_id}' not found")
        return {"server": {k: v for k, v in server.items() if k != "user_data"}}

    def delete_server(self, server_id: int) -> dict[str, Any]:
        self.get_server(server_id)
        server = self.state.servers.pop(server_id)
        server["deleted_at"] = _now()
        self.state.deleted.append(server)
        if self.state.halt is not None:
            threading.Thread(target=self.state.halt, args=(server,), daemon=True).start()
        return {"action": self._action("delete_server", server_id)}

    def get_action(self, action_id: int) -> dict[str, Any]:
        action = self.state.actions.get(action_id)
        if action is None:
            raise ApiError(404, "not_found", f"action with ID '{action_id}' not found")
        public = action["public"]
        if public["status"] == "running":
            action["polls"] += 1
            if action["polls"] > self.state.action_polls:
                public.update(status="success", progress=100, finished=_now())
                action["on_success"]()
        return {"action": public}

    def _action(self, command: str, server_id: int, on_success: Callable[[], None] = lambda: None) -> dict:
        action_id = self.state.next_id()
        public = {"id": action_id, "command": command, "status": "running", "progress": 0, "started": _now(),
                  "finished": None, "resources": [{"id": server_id, "type": "server"}], "error": None}
        self.state.actions[action_id] = {"public": public, "polls": 0, "on_success": on_success}
        return public

    def list_of(self, kind: str, query: dict[str, str]) -> dict[str, Any]:
        names, to_json = {"server_types": (SERVER_TYPES, server_type_json), "locations": (LOCATIONS, location_json),
                          "images": (IMAGES, image_json)}[kind]
        items = [to_json(n) for n in names if query.get("name", n) == n]
        pagination = {"page": 1, "per_page": 50, "previous_page": None, "next_page": None, "last_page": 1,
                      "total_entries": len(items)}
        return {kind: items, "meta": {"pagination": pagination}}


ROUTES: tuple[tuple[str, re.Pattern[str], Callable[[FakeHetznerApi, re.Match[str], dict, dict], dict]], ...] = (
    ("GET", re.compile(r"/v1/servers"), lambda api, m, q, b: api.list_servers(q)),
    ("POST", re.compile(r"/v1/servers"), lambda api, m, q, b: api.create_server(b)),
    ("GET", re.compile(r"/v1/servers/(\d+)"), lambda api, m, q, b: api.get_server(int(m[1]))),
    ("DELETE", re.compile(r"/v1/servers/(\d+)"), lambda api, m, q, b: api.delete_server(int(m[1]))),
    ("GET", re.compile(r"/v1/actions/(\d+)"), lambda api, m, q, b: api.get_action(int(m[1]))),
    ("GET", re.compile(r"/v1/(server_types|locations|images)"), lambda api, m, q, b: api.list_of(m[1], q)),
)


class _Handler(BaseHTTPRequestHandler):
    api: FakeHetznerApi

    def log_message(self, format: str, *args: Any) -> None:  # Quiet: tests read the state.
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        url = urlparse(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        state = self.api.state
        with state.lock:
            state.requests.append((self.command, url.path, body))
            try:
                payload = self._answer(url.path, query, body)
                status = 201 if self.command == "POST" else 200
            except ApiError as error:
                payload = {"error": {"code": error.code, "message": error.message, "details": {}}}
                status = error.status
        self._reply(status, payload)

    def _answer(self, path: str, query: dict[str, str], body: dict | None) -> dict[str, Any]:
        state = self.api.state
        if self.headers.get("Authorization") != f"Bearer {state.token}":
            raise ApiError(401, "unauthorized", "unable to authenticate")
        if state.rate_limited_requests > 0:
            state.rate_limited_requests -= 1
            raise ApiError(429, "rate_limit_exceeded", f"limit of {RATE_LIMIT} requests per hour reached")
        for method, pattern, route in ROUTES:
            match = pattern.fullmatch(path)
            if match and method == self.command:
                return route(self.api, match, query, body or {})
        raise ApiError(404, "not_found", f"no route {self.command} {path}")

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("RateLimit-Limit", str(RATE_LIMIT))
        self.send_header("RateLimit-Remaining", "0" if status == 429 else str(RATE_LIMIT - 1))
        self.send_header("RateLimit-Reset", "1")
        self.send_header("X-Correlation-Id", "fake-hetzner")
        self.end_headers()
        self.wfile.write(data)


class FakeHetzner:
    """The fake API on 127.0.0.1 (a port of its own); `endpoint` is what `hcloud.Client` takes."""

    def __init__(self, *, token: str, host: str = "127.0.0.1") -> None:
        self.state = FakeHetznerState(token=token)
        handler = type("Handler", (_Handler,), {"api": FakeHetznerApi(self.state)})
        self._server = ThreadingHTTPServer((host, 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeHetzner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def servers(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return list(self.state.servers.values())

    def user_data_of(self, server_id: int) -> str | None:
        with self.state.lock:
            server = self.state.servers.get(server_id) or next(
                (s for s in self.state.deleted if s["id"] == server_id), None)
            return server and server.get("user_data")


class NetnsBooter:
    """Boots the fake's servers as a VM would run: each server's user_data runs as root in a network
    namespace of its own (reaching the host only through a bridge, at `host_address`: no loopback
    to the host, no internet), in its own root dir (its disk; the host's /usr and /etc read-only,
    `image_python` as the image's python3) and its own process group. `fake.state.boot = booter.boot`.
    A VM outlives the thread that booted it (no --die-with-parent: the fake boots from a request's
    short-lived thread); `halt` and leaving the booter stop it."""

    def __init__(self, root: Path, *, image_python: Path) -> None:
        self.root = root
        self.image_python = image_python
        self.tag = secrets.token_hex(2)
        self.subnet = f"10.{secrets.choice(range(100, 250))}"
        self.bridge = f"bhz{self.tag}"
        self.processes: dict[int, subprocess.Popen] = {}

    @property
    def host_address(self) -> str:
        return f"{self.subnet}.0.1"

    def __enter__(self) -> NetnsBooter:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.host_address}/16", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def __exit__(self, *exc: object) -> None:
        for server_id in list(self.processes):
            self.halt({"id": server_id})
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def disk(self, server_id: int) -> Path:
        return self.root / f"server-{server_id}"

    def boot(self, server: dict[str, Any]) -> None:
        server_id, namespace = server["id"], f"bhz{self.tag}-{server['id']}"
        host_end, vm_end = f"bh{self.tag}h{server_id % 10000}", f"bh{self.tag}v{server_id % 10000}"
        address = f"{self.subnet}.{server_id // 250 % 250 + 1}.{server_id % 250 + 2}"
        _ip("netns", "add", namespace)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", vm_end)
        _ip("link", "set", vm_end, "netns", namespace)
        _ip("link", "set", host_end, "master", self.bridge, "up")
        for args in (("addr", "add", f"{address}/16", "dev", vm_end), ("link", "set", vm_end, "up"),
                     ("link", "set", "lo", "up"), ("route", "add", "default", "via", self.host_address)):
            _ip("netns", "exec", namespace, "ip", *args)
        disk = self.disk(server_id)
        for part in ("opt", "var/lib/cloud/instance", "var/log", "root", "tmp", "image"):
            (disk / part).mkdir(parents=True, exist_ok=True)
        (disk / "var/lib/cloud/instance/user-data.txt").write_text(server.get("user_data") or "")
        log = (disk / "var/log/cloud-init-output.log").open("wb")
        self.processes[server_id] = subprocess.Popen(
            ["ip", "netns", "exec", namespace, "bwrap", *self._root_of(disk),
             "/bin/sh", "/var/lib/cloud/instance/user-data.txt"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={"PATH": "/image/bin:/usr/local/bin:/usr/bin:/bin", "HOME": "/root"})

    def _root_of(self, disk: Path) -> list[str]:
        venv = self.image_python.parent.parent
        base = Path(os.path.realpath(self.image_python)).parent.parent
        return ["--bind", str(disk), "/", "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc",
                "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
                "--symlink", "usr/sbin", "/sbin", "--ro-bind", str(venv), "/image", "--ro-bind", str(base), str(base),
                "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/root"]

    def halt(self, server: dict[str, Any]) -> None:
        server_id, namespace = server["id"], f"bhz{self.tag}-{server['id']}"
        process = self.processes.pop(server_id, None)
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
        for pid in pids:  # anything the user_data left running in the VM's network
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "link", "del", f"bh{self.tag}h{server_id % 10000}"], capture_output=True)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)

    def running(self, server_id: int) -> bool:
        process = self.processes.get(server_id)
        return process is not None and process.poll() is None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def netns_available() -> str | None:
    """None if this machine can boot fake servers in network namespaces, else why not."""
    if os.geteuid() != 0:
        return "booting a fake server needs root (ip netns)"
    if not shutil.which("bwrap"):
        return "booting a fake server needs bwrap"
    probe = f"bhzprobe{os.getpid()}"
    result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None if result.returncode == 0 else f"ip netns does not work here: {result.stderr.strip()}"
