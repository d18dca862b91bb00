"""A scripted OpenAI-compatible model server: the Chat Completions API with streaming (SSE), as
`@ai-sdk/openai-compatible` (OpenCode's provider for any OpenAI-like endpoint) speaks it.

`POST /v1/chat/completions` with the right `Authorization: Bearer <key>` answers, in turn:
a turn that has no tool result yet gets one tool call (`write` a file: OpenCode's tool, with
`filePath` and `content`); a turn that carries the tool's result gets the final text. A request
without tools (OpenCode titling the session) gets a short title. Every answer ends with a chunk
carrying `usage` (the token counts below), then `data: [DONE]`. `GET /v1/models` lists the model.
Every request body is recorded, so a test can check that the prompt reached the model.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "fake-coder-1"
TOOL_CALL_USAGE = {"prompt_tokens": 1200, "completion_tokens": 34}
FINAL_USAGE = {"prompt_tokens": 1300, "completion_tokens": 21}
TITLE_USAGE = {"prompt_tokens": 50, "completion_tokens": 3}


@dataclass
class ToolScript:
    """What the fake model does: write `content` to `file_path` (relative to the agent's cwd
    unless absolute), then say `final_text`."""

    file_path: str
    content: str
    final_text: str = "Done: the file is written."
    tool_call_id: str = "call_fake_write_1"


@dataclass
class FakeOpenAIChat:
    api_key: str
    script: ToolScript
    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    """Every chat completion request body, in order."""
    paths: list[str] = field(default_factory=list)
    """Every `METHOD path` asked, in order (to see what the client calls)."""
    refused: int = 0
    """Requests refused for a wrong or missing key."""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def saw(self, text: str) -> bool:
        """Whether any request body the model received contains `text`."""
        return any(text in json.dumps(body) for body in self.requests)

    def answer(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The stream of chunks for one request (without the final [DONE])."""
        if not body.get("tools"):
            return _text_chunks("Writing a file", TITLE_USAGE)
        if any(message.get("role") == "tool" for message in body.get("messages", [])):
            return _text_chunks(self.script.final_text, FINAL_USAGE)
        return _tool_call_chunks(self.script)


def _chunk(delta: dict[str, Any] | None, finish_reason: str | None = None,
           usage: dict[str, int] | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    chunk: dict[str, Any] = {"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                             "created": int(time.time()), "model": MODEL, "choices": choices}
    if usage is not None:
        chunk["usage"] = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
    return chunk


def _text_chunks(text: str, usage: dict[str, int]) -> list[dict[str, Any]]:
    middle = len(text) // 2
    return [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": text[:middle]}),
        _chunk({"content": text[middle:]}),
        _chunk({}, "stop"),
        _chunk(None, usage=usage),
    ]


def _tool_call_chunks(script: ToolScript) -> list[dict[str, Any]]:
    arguments = json.dumps({"filePath": script.file_path, "content": script.content})
    middle = len(arguments) // 2
    start = {"index": 0, "id": script.tool_call_id, "type": "function",
             "function": {"name": "write", "arguments": arguments[:middle]}}
    rest = {"index": 0, "function": {"arguments": arguments[middle:]}}
    return [
        _chunk({"role": "assistant", "content": None, "tool_calls": [start]}),
        _chunk({"tool_calls": [rest]}),
        _chunk({}, "tool_calls"),
        _chunk(None, usage=TOOL_CALL_USAGE),
    ]


def _handler(fake: FakeOpenAIChat) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # Quiet: the test reports what matters.

        def do_GET(self) -> None:
            fake.paths.append(f"GET {self.path}")
            if not self._authorized():
                return
            if self.path.rstrip("/").endswith("/models"):
                self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]})
            else:
                self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self) -> None:
            fake.paths.append(f"POST {self.path}")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self._authorized():
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            request = json.loads(body)
            fake.requests.append(request)
            if request.get("stream"):
                self._stream(fake.answer(request))
            else:
                self._json(400, {"error": {"message": "this fake only streams", "type": "invalid_request_error"}})

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {fake.api_key}":
                return True
            fake.refused += 1
            self._json(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                       "code": "invalid_api_key"}})
            return False

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self, chunks: list[dict[str, Any]]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for chunk in chunks:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

    return Handler


@contextmanager
def serving_fake_openai_chat(*, api_key: str, script: ToolScript) -> Iterator[FakeOpenAIChat]:
    """Run the fake on 127.0.0.1 (a free port) for the duration of the block."""
    fake = FakeOpenAIChat(api_key=api_key, script=script)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="fake-openai-chat", daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
