"""A scripted OpenAI Responses API, as Codex speaks it, on a local port.

`POST {base_url}/responses` (base_url ends in `/v1`) streams Server-Sent Events as
api.openai.com does: `response.created`, `response.output_item.added`, `response.output_text.delta`,
`response.output_item.done`, `response.completed` with `usage`. The script: a request that does not
yet carry the scripted call's output gets that tool call: Codex's `apply_patch` (a freeform
`custom_tool_call` whose input is a patch adding `file_name`), or its `exec_command` (a
`function_call`); the request carrying its output (`…_output`) gets a final assistant message. Each response reports `input_tokens`
and `output_tokens`, so a turn of two requests uses twice each (`turn_usage`).

Every request needs `Authorization: Bearer <api_key>` (else a 401 as OpenAI's). Every request
(method, path, headers, JSON body) is recorded, so a test can assert what the agent sent (its
prompt's nonce). Anything else is a 404 in OpenAI's error shape (Codex asks for nothing else when
its config turns plugins, analytics and update checks off).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOOL_CALL_ID = "call_baton_write_file"
INPUT_TOKENS = 1234
OUTPUT_TOKENS = 56


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    authorized: bool

    def text(self) -> str:
        """The body as text (to look for a nonce)."""
        return json.dumps(self.body) if self.body is not None else ""


@dataclass
class ResponsesScript:
    """What the fake model does: write `content` to `file_name` (relative to the agent's cwd) with
    `apply_patch`, or, given a `command`, run it with `exec_command`; then say `final_message`.
    Each response reports `input_tokens`/`output_tokens`."""

    file_name: str = ""
    content: str = ""
    command: str | None = None
    final_message: str = "I wrote the file."
    input_tokens: int = INPUT_TOKENS
    output_tokens: int = OUTPUT_TOKENS

    def patch(self) -> str:
        """The `apply_patch` grammar's patch that adds the file."""
        added = "".join(f"+{line}\n" for line in self.content.splitlines())
        return f"*** Begin Patch\n*** Add File: {self.file_name}\n{added}*** End Patch\n"


@dataclass
class FakeOpenAIResponses:
    """The running fake: `base_url` (ends in /v1) for a provider's `base_url`; `requests` seen."""

    api_key: str
    script: ResponsesScript
    base_url: str = ""
    requests: list[RecordedRequest] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    @property
    def refused(self) -> int:
        """How many requests came without the right key."""
        with self._lock:
            return sum(1 for r in self.requests if not r.authorized)

    @property
    def turn_usage(self) -> tuple[int, int]:
        """(input, output) tokens of a turn that made the tool call and then answered: two responses."""
        return 2 * self.script.input_tokens, 2 * self.script.output_tokens

    def responses_requests(self) -> list[RecordedRequest]:
        """The requests of the task's own turn (not Codex's side call that titles the thread)."""
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path.endswith("/responses")
                    and not _asks_for_a_title(r.body)]

    def title_requests(self) -> list[RecordedRequest]:
        """Codex's side call, once the turn has started, for a short title of the thread."""
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and _asks_for_a_title(r.body)]

    def saw(self, text: str) -> bool:
        """Whether any request to the Responses endpoint carried `text`."""
        return any(text in request.text() for request in self.responses_requests())


@contextmanager
def fake_openai_responses(*, api_key: str, script: ResponsesScript) -> Iterator[FakeOpenAIResponses]:
    """Serve the fake on 127.0.0.1 (port 0) until the block ends."""
    fake = FakeOpenAIResponses(api_key=api_key, script=script)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(fake))
    server.daemon_threads = True
    fake.base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, name="fake-openai", daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _handler_for(fake: FakeOpenAIResponses) -> type[BaseHTTPRequestHandler]:
    class Handler(_ResponsesHandler):
        pass

    Handler.fake = fake
    return Handler


class _ResponsesHandler(BaseHTTPRequestHandler):
    fake: FakeOpenAIResponses
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # Quiet: the test reads `requests`.

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._handle(body=None)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        self._handle(body=_json_or_text(raw))

    def _handle(self, body: Any) -> None:
        authorized = self.headers.get("Authorization") == f"Bearer {self.fake.api_key}"
        self.fake.record(RecordedRequest(self.command, self.path, dict(self.headers.items()), body, authorized))
        if not authorized:
            return self._json(401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                              "code": "invalid_api_key", "param": None}})
        path = self.path.split("?", 1)[0]
        if self.command == "POST" and path.endswith("/responses"):
            return self._stream(_script_events(self.fake.script, body))
        self._json(404, {"error": {"message": f"no route {self.command} {path}", "type": "invalid_request_error"}})

    def _json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, events: list[dict[str, Any]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for event in events:
            self.wfile.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
        self.close_connection = True


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", errors="replace")


TITLE_REQUEST = "generate a very short title for a conversation"


def _asks_for_a_title(body: Any) -> bool:
    return TITLE_REQUEST in json.dumps(body)


def _script_events(script: ResponsesScript, body: Any) -> list[dict[str, Any]]:
    """The SSE events answering one request: the tool call first, the final message once its output
    came; a request for the thread's title gets a short title."""
    if _asks_for_a_title(body):
        item = {"type": "message", "id": "msg_baton_title", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "Write the nonce", "annotations": []}]}
        return _response_events("resp_baton_title", item, script, text="Write the nonce")
    if _carries_call_output(body):
        item = {"type": "message", "id": "msg_baton_final", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": script.final_message, "annotations": []}]}
        return _response_events("resp_baton_2", item, script, text=script.final_message)
    return _response_events("resp_baton_1", _tool_call(script), script)


def _tool_call(script: ResponsesScript) -> dict[str, Any]:
    if script.command is not None:
        return {"type": "function_call", "id": "fc_baton_1", "call_id": TOOL_CALL_ID, "name": "exec_command",
                "status": "completed", "arguments": json.dumps({"cmd": script.command})}
    return {"type": "custom_tool_call", "id": "ctc_baton_1", "call_id": TOOL_CALL_ID, "name": "apply_patch",
            "status": "completed", "input": script.patch()}


def _carries_call_output(body: Any) -> bool:
    items = body.get("input", []) if isinstance(body, dict) else []
    return any(isinstance(item, dict) and item.get("call_id") == TOOL_CALL_ID
               and item.get("type", "").endswith("_output") for item in items)


def _response_events(response_id: str, item: dict[str, Any], script: ResponsesScript,
                     text: str | None = None) -> list[dict[str, Any]]:
    started = {"id": response_id, "object": "response", "status": "in_progress", "output": []}
    added = {**item, "status": "in_progress"}
    if item["type"] == "message":
        added["content"] = []
    if item["type"] == "custom_tool_call":
        added["input"] = ""
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.output_item.added", "output_index": 0, "item": added},
    ]
    if text is not None:
        events.append({"type": "response.output_text.delta", "item_id": item["id"], "output_index": 0,
                       "content_index": 0, "delta": text})
    usage = {"input_tokens": script.input_tokens, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": script.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": script.input_tokens + script.output_tokens}
    events += [
        {"type": "response.output_item.done", "output_index": 0, "item": item},
        {"type": "response.completed",
         "response": {**started, "status": "completed", "output": [item], "usage": usage}},
    ]
    return events
