"""A scripted Anthropic Messages API on a local port, for driving the real Claude Code offline.

It speaks the API as Claude Code's SDK uses it: `HEAD /` (a reachability probe), `POST
/v1/messages` answered as Server-Sent Events (`message_start`, `content_block_start`,
`content_block_delta` with `text_delta` / `input_json_delta`, `content_block_stop`,
`message_delta` with `stop_reason` and `usage`, `message_stop`), `POST
/v1/messages/count_tokens`, and the `x-api-key` (or `Authorization: Bearer`) header, refused
with the API's own 401 body when wrong.

The script: the agent's main turn (a request offering the `Write` tool) is first answered with
a `Write` tool call that creates `script.file_name` in the agent's working directory (read from
the system prompt, as Claude Code states it there), and once the tool's result comes back, with
`script.final_text`. Every other call (a conversation title, a quota probe…) gets a short text.
Each main-turn answer reports `script.input_tokens` / `script.output_tokens` in its usage.
Every request is recorded, so a test can tell what reached the model.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

WRITE_TOOL = "Write"
_WORKING_DIRECTORY = re.compile(r"(?:Primary working directory|Working directory): (/[^\s<]+)")


@dataclass(frozen=True)
class ClaudeScript:
    """What the fake model does in the main turn."""

    file_name: str
    file_content: str
    final_text: str = "I wrote the file."
    input_tokens: int = 1234
    output_tokens: int = 56
    fallback_cwd: str = "/workspace"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    body: dict[str, Any]


@dataclass
class FakeAnthropic:
    """The running fake: its `url` goes in ANTHROPIC_BASE_URL, its `api_key` in ANTHROPIC_API_KEY."""

    api_key: str
    script: ClaudeScript
    url: str = ""
    requests: list[RecordedRequest] = field(default_factory=list)
    refused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def messages(self) -> list[dict[str, Any]]:
        """The bodies of every `POST /v1/messages`, in arrival order."""
        with self._lock:
            return [r.body for r in self.requests if r.path.split("?")[0] == "/v1/messages"]

    def main_turn_calls(self) -> list[dict[str, Any]]:
        """The bodies of the calls that played the script (those offering the Write tool), each
        once: a call the SDK retried (it does on a slow answer) counts once, as in its usage."""
        distinct = {json.dumps(body, sort_keys=True): body for body in self.messages() if _offers_write(body)}
        return list(distinct.values())

    def saw(self, text: str) -> bool:
        """Whether any message request carried `text` (in its messages or system prompt)."""
        return any(text in json.dumps(body, ensure_ascii=False) for body in self.messages())

    @property
    def reported_usage(self) -> tuple[int, int]:
        """(input, output) tokens this fake reported over the whole scripted turn."""
        calls = len(self.main_turn_calls())
        return calls * self.script.input_tokens, calls * self.script.output_tokens

    def answer(self, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """The SSE events answering one `POST /v1/messages` body."""
        model = str(body.get("model", "claude-fake"))
        if not _offers_write(body):
            return _message_events(model, [_text_block("Baton task")], "end_turn", 10, 3)
        usage = (self.script.input_tokens, self.script.output_tokens)
        if _has_tool_result(body):
            return _message_events(model, [_text_block(self.script.final_text)], "end_turn", *usage)
        path = f"{_working_directory(body, self.script.fallback_cwd).rstrip('/')}/{self.script.file_name}"
        write = _tool_use_block(WRITE_TOOL, {"file_path": path, "content": self.script.file_content})
        return _message_events(model, [_text_block("Writing the file."), write], "tool_use", *usage)


@contextmanager
def running_fake_anthropic(api_key: str, script: ClaudeScript) -> Iterator[FakeAnthropic]:
    """Serve the fake on 127.0.0.1 (a free port) until the block ends."""
    fake = FakeAnthropic(api_key=api_key, script=script)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(fake))
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="fake-anthropic", daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def _handler_for(fake: FakeAnthropic) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:  # Quiet: the test reads `fake.requests`.
            pass

        def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
            self._send(HTTPStatus.OK, b"", "text/plain")

        def do_GET(self) -> None:  # noqa: N802
            fake.record(RecordedRequest("GET", self.path, {}))
            self._send_json(HTTPStatus.NOT_FOUND, _error("not_found_error", f"no route {self.path}"))

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw or b"{}")
            path = self.path.split("?")[0]
            fake.record(RecordedRequest("POST", self.path, body))
            if not self._authorized():
                fake.refused += 1
                self._send_json(HTTPStatus.UNAUTHORIZED, _error("authentication_error", "invalid x-api-key"))
            elif path == "/v1/messages/count_tokens":
                self._send_json(HTTPStatus.OK, {"input_tokens": len(raw) // 4})
            elif path == "/v1/messages":
                self._send_message(body)
            else:
                self._send_json(HTTPStatus.NOT_FOUND, _error("not_found_error", f"no route {path}"))

        def _authorized(self) -> bool:
            bearer = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            return fake.api_key in (self.headers.get("x-api-key"), bearer)

        def _send_message(self, body: dict[str, Any]) -> None:
            events = fake.answer(body)
            if body.get("stream"):
                sse = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)
                self._send(HTTPStatus.OK, sse.encode(), "text/event-stream")
            else:
                self._send_json(HTTPStatus.OK, _assembled(events))

        def _send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _send(self, status: HTTPStatus, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("request-id", f"req_{uuid.uuid4().hex}")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return Handler


def _offers_write(body: dict[str, Any]) -> bool:
    return any(tool.get("name") == WRITE_TOOL for tool in body.get("tools") or [])


def _has_tool_result(body: dict[str, Any]) -> bool:
    last = (body.get("messages") or [{}])[-1]
    content = last.get("content")
    return isinstance(content, list) and any(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in content)


def _working_directory(body: dict[str, Any], fallback: str) -> str:
    """The cwd Claude Code states in its prompt (system or the first user message)."""
    found = _WORKING_DIRECTORY.search(json.dumps(body.get("system", "")).replace("\\n", "\n"))
    found = found or _WORKING_DIRECTORY.search(json.dumps(body.get("messages", [])).replace("\\n", "\n"))
    return found.group(1).strip() if found else fallback


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _tool_use_block(name: str, tool_input: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": name, "input": tool_input}


def _message_events(model: str, blocks: list[dict[str, Any]], stop_reason: str,
                    input_tokens: int, output_tokens: int) -> list[tuple[str, dict[str, Any]]]:
    """One message as the API streams it: start, each block (start, delta, stop), delta, stop."""
    message = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": model,
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": input_tokens, "output_tokens": 1,
                         "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
    events: list[tuple[str, dict[str, Any]]] = [("message_start", {"type": "message_start", "message": message})]
    for index, block in enumerate(blocks):
        events += _block_events(index, block)
    events.append(("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                     "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                                               "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}))
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def _block_events(index: int, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if block["type"] == "text":
        opening = {"type": "text", "text": ""}
        delta = {"type": "text_delta", "text": block["text"]}
    else:
        opening = {**block, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
    return [
        ("content_block_start", {"type": "content_block_start", "index": index, "content_block": opening}),
        ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}),
        ("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]


def _assembled(events: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The non-streaming answer equivalent to `events`."""
    message = dict(events[0][1]["message"])
    message["content"] = [data["content_block"] for name, data in events if name == "content_block_start"]
    for name, data in events:
        if name == "content_block_delta" and data["delta"]["type"] == "text_delta":
            message["content"][data["index"]] = {"type": "text", "text": data["delta"]["text"]}
        elif name == "content_block_delta":
            message["content"][data["index"]]["input"] = json.loads(data["delta"]["partial_json"])
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"] = data["usage"]
    return message


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}
