"""A gate a shell task waits at until the test opens it: no task's timing rests on a `sleep`
outlasting the test's next look (which a loaded machine does not promise).

The agent runs in its sandbox with the host's network, so it polls a loopback HTTP server of the
test's: 503 while shut, 200 once open.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Gate:
    def __init__(self, server: ThreadingHTTPServer) -> None:
        self._server = server
        self.opened = threading.Event()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def open(self) -> None:
        self.opened.set()

    def is_open_command(self) -> str:
        """A bash condition, true once the gate is open: one request over bash's own /dev/tcp (no
        program started, so a task can ask twice a second for minutes at little cost)."""
        host, port = self._server.server_address[:2]
        return (f"(exec 3<>/dev/tcp/{host}/{port} && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 "
                f"&& read -r _ code _ <&3 && [ \"$code\" = 200 ])")

    def wait_command(self) -> str:
        """A shell line that returns once the gate is open."""
        return f"until {self.is_open_command()}; do sleep 0.05; done\n"


@contextmanager
def gate() -> Iterator[Gate]:
    """A shut gate on a free loopback port, for the duration of the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    the_gate = Gate(server)
    server.gate = the_gate  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield the_gate
    finally:
        server.shutdown()
        server.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        opened = self.server.gate.opened.is_set()  # type: ignore[attr-defined]
        self.send_response(200 if opened else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass
