"""A scripted judge behind a real OpenAI-style HTTP server on loopback, for the judge tests.

The server speaks `POST /v1/chat/completions` and answers with the JSON a judge would write.
By default it is position-biased: it names "A" the winner of every pairwise question and
gives every pointwise question the same score. A `decide(body) -> dict` function replaces that
policy. It can also fail its first `fail_first` requests with `fail_status`, answer every
request with `error_status`, sleep `delay` seconds before answering (to run past a client's
timeout), or send `content` verbatim in place of a verdict. It records every request it got
(headers and body) and the most requests it had in flight at once. A client that gave up
before the answer (a timeout) may return before its request is recorded:
`wait_for_requests(n)` waits until it is.

Use: `with JudgeServer() as server: ... server.url ...` (the url ends in `/v1`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def user_text(self) -> str:
        return "\n".join(m["content"] for m in self.body["messages"] if m["role"] == "user")


def is_pairwise(body: dict[str, Any]) -> bool:
    schema = body["response_format"]["json_schema"]["schema"]
    return "winner" in schema["properties"]


def position_biased(score: int = 7) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Always "A" for a pair (whatever the order), always `score` for a single response."""

    def decide(body: dict[str, Any]) -> dict[str, Any]:
        if is_pairwise(body):
            return {"rationale": "The first response is better.", "winner": "A"}
        return {"rationale": f"Fixed score {score}.", "score": score}

    return decide


class JudgeServer:
    def __init__(
        self,
        decide: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        *,
        fail_first: int = 0,
        fail_status: int = 500,
        error_status: int | None = None,
        error_message: str = "scripted failure",
        delay: float = 0.0,
        content: str | None = None,
        finish_reason: str = "stop",
        retry_after: str | None = None,
    ) -> None:
        self.decide = decide or position_biased()
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.error_status = error_status
        self.error_message = error_message
        self.delay = delay
        self.content = content
        self.finish_reason = finish_reason
        self.retry_after = retry_after
        self.received: list[Received] = []
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._recorded = threading.Condition(self._lock)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> JudgeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_requests(self, count: int, timeout: float = 30.0) -> None:
        """Wait until at least `count` requests have been recorded (or `timeout` s passed)."""
        with self._recorded:
            self._recorded.wait_for(lambda: len(self.received) >= count, timeout)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def _reply(
        self, body: dict[str, Any], number: int
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, extra headers) for request `number` (1 for the first one)."""
        if number <= self.fail_first:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return self.fail_status, _error(self.error_message, self.fail_status), headers
        if self.error_status is not None:
            return self.error_status, _error(self.error_message, self.error_status), {}
        content = self.content if self.content is not None else json.dumps(self.decide(body))
        answer = {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        return 200, answer, {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                status = 200 if self.path == "/v1/models" else 404
                data = json.dumps({"object": "list", "data": []}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw or b"{}")
                with server._lock:
                    server.received.append(Received(dict(self.headers.items()), body))
                    # Numbered on arrival: read later, len(received) would count requests
                    # that came in meanwhile (fail_first would then spare a concurrent one).
                    number = len(server.received)
                    server._recorded.notify_all()
                    server._in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server._in_flight)
                try:
                    if server.delay:
                        time.sleep(server.delay)
                    if self.path != "/v1/chat/completions":
                        status, answer, headers = 404, _error(f"no route {self.path}", 404), {}
                    else:
                        status, answer, headers = server._reply(body, number)
                finally:
                    # Counted out before the reply is written: once the client has read it, it
                    # may send its next request, and that must not find this one still counted.
                    with server._lock:
                        server._in_flight -= 1
                try:
                    data = json.dumps(answer).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # keep test output quiet

        return Handler


def _error(message: str, status: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": "scripted", "code": status}}
