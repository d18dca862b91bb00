"""A scripted Gemini API on 127.0.0.1, as Gemini CLI (`GOOGLE_GEMINI_BASE_URL`) speaks to it.

It answers what the CLI calls with an API key (`x-goog-api-key` header, or `?key=`):
`POST /v1beta/models/<model>:streamGenerateContent?alt=sse` (the turn, as server-sent events
`data: {"candidates": [...], "usageMetadata": {...}}`), `…:generateContent` (the CLI's own side
calls: model routing, next-speaker checks; answered with the JSON they ask for), `…:countTokens`
and `GET /v1beta/models`. The script: the first turn request gets a `write_file` function call
(a file in the agent's working directory), any request carrying its function response gets the
final text. Every request is recorded, so a test can see what reached the model."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

FINAL_TEXT = "Done: the file is written."
THOUGHT_TEXT = "The user wants one file written; write_file does it."


@dataclass(frozen=True)
class Usage:
    """The token counts the fake reports for each turn reply (Gemini's `usageMetadata`)."""

    prompt_tokens: int = 1234
    candidates_tokens: int = 56
    thoughts_tokens: int = 7
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.candidates_tokens + self.thoughts_tokens

    def metadata(self) -> dict[str, int]:
        return {"promptTokenCount": self.prompt_tokens, "candidatesTokenCount": self.candidates_tokens,
                "thoughtsTokenCount": self.thoughts_tokens, "cachedContentTokenCount": self.cached_tokens,
                "totalTokenCount": self.total_tokens}


@dataclass(frozen=True)
class Request:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    api_key: str
    body: dict[str, Any]

    @property
    def action(self) -> str:
        """`streamGenerateContent`, `generateContent`, `countTokens`… (empty for other paths)."""
        return self.path.rpartition(":")[2] if ":" in self.path else ""

    def text(self) -> str:
        """The body as JSON text (search it for a nonce)."""
        return json.dumps(self.body)


@dataclass
class FakeGemini:
    """The fake's script and what it saw. `url` is the base URL to give the CLI."""

    api_key: str
    file_path: str
    file_content: str
    usage: Usage = field(default_factory=Usage)
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    replies_with_usage: int = 0
    """How many turn replies reported `usage` (the CLI adds them up over its prompt turn)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def turn_requests(self) -> list[Request]:
        return [r for r in list(self.requests) if r.action == "streamGenerateContent"]

    def saw(self, text: str) -> bool:
        """Whether any turn request carried `text` (the prompt reached the model)."""
        return any(text in r.text() for r in self.turn_requests())

    def reply_to_turn(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The SSE chunks for one turn request: the write, or the final text once it was done."""
        with self._lock:
            self.replies_with_usage += 1
        if _has_function_response(body):
            head, tail = FINAL_TEXT[:6], FINAL_TEXT[6:]  # Streamed in two pieces, as a model does.
            return [_chunk([{"text": head}]), _chunk([{"text": tail}], finish="STOP", usage=self.usage)]
        call = {"functionCall": {"name": "write_file",
                                 "args": {"file_path": self.file_path, "content": self.file_content}}}
        # A thought starts with its subject in bold, as Gemini's do.
        thought = {"text": f"**Writing the file**\n{THOUGHT_TEXT}", "thought": True}
        return [_chunk([thought]), _chunk([{"text": "I will write the file."}]),
                _chunk([call], finish="STOP", usage=self.usage)]


def _has_function_response(body: dict[str, Any]) -> bool:
    contents = body.get("contents") or []
    last = contents[-1] if contents else {}
    return any("functionResponse" in part for part in last.get("parts") or [])


def _chunk(parts: list[dict[str, Any]], *, finish: str | None = None, usage: Usage | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    chunk: dict[str, Any] = {"candidates": [candidate], "modelVersion": "gemini-2.5-pro"}
    if usage:
        chunk["usageMetadata"] = usage.metadata()
    return chunk


def _side_call_reply(body: dict[str, Any]) -> dict[str, Any]:
    """A `generateContent` side call (routing, next speaker…): a JSON object fitting its schema."""
    config = body.get("generationConfig") or {}
    schema = config.get("responseJsonSchema") or config.get("responseSchema") or {}
    properties = schema.get("properties") or {}
    answer = {name: _SIDE_CALL_ANSWERS.get(name, _placeholder(spec)) for name, spec in properties.items()}
    reply = _chunk([{"text": json.dumps(answer)}], finish="STOP")
    reply["usageMetadata"] = {"promptTokenCount": 1, "candidatesTokenCount": 1, "totalTokenCount": 2}
    return reply


_SIDE_CALL_ANSWERS: dict[str, Any] = {
    "complexity_reasoning": "One explicit file write.", "complexity_score": 10,  # the model router
    "reasoning": "The model finished.", "model_choice": "flash", "next_speaker": "user",
}
"""What the CLI's side calls ask for, by the name of the field they want (the rest get a default)."""


def _placeholder(spec: dict[str, Any]) -> Any:
    kind = str(spec.get("type", "string")).lower()
    return {"boolean": False, "number": 0, "integer": 0, "array": [], "object": {}}.get(kind, "")


def _handler(fake: FakeGemini) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            request = self._record(b"")
            if request is None:
                return
            if request.path.rstrip("/").endswith("/models"):
                self._send_json(200, {"models": [{"name": "models/gemini-2.5-pro"}, {"name": "models/gemini-2.5-flash"}]})
            else:
                self._send_json(404, _error(404, f"no route {request.path}"))

        def do_POST(self) -> None:
            request = self._record(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            if request is None:
                return
            if request.action == "streamGenerateContent":
                self._send_sse(fake.reply_to_turn(request.body))
            elif request.action == "generateContent":
                self._send_json(200, _side_call_reply(request.body))
            elif request.action == "countTokens":
                self._send_json(200, {"totalTokens": len(request.text()) // 4})
            else:
                self._send_json(404, _error(404, f"no route {request.path}"))

        def log_message(self, format: str, *args: object) -> None:
            pass  # Quiet: the test reports what matters.

        def _record(self, raw: bytes) -> Request | None:
            target = urlsplit(self.path)
            query = parse_qs(target.query)
            api_key = self.headers.get("x-goog-api-key") or (query.get("key") or [""])[0]
            body = json.loads(raw) if raw.strip() else {}
            request = Request(self.command, target.path, query, api_key, body)
            fake.record(request)
            if api_key != fake.api_key:
                self._send_json(400, _error(400, "API key not valid. Please pass a valid API key.",
                                            status="INVALID_ARGUMENT"))
                return None
            return request

        def _send_json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _send_sse(self, chunks: list[dict[str, Any]]) -> None:
            data = b"".join(f"data: {json.dumps(chunk)}\r\n\r\n".encode() for chunk in chunks)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _error(code: int, message: str, *, status: str = "NOT_FOUND") -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


@contextmanager
def running_fake_gemini(*, api_key: str, file_path: str, file_content: str,
                        usage: Usage | None = None) -> Iterator[FakeGemini]:
    """Serve a FakeGemini on a free port until the block ends."""
    fake = FakeGemini(api_key=api_key, file_path=file_path, file_content=file_content, usage=usage or Usage())
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="fake-gemini", daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
