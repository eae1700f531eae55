"""A webhook receiver for the tests: a real HTTP server on a free local port, and the
signature check a receiver makes (``service.webhooks.verify``)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from service import webhooks

SECRET = "s3cret-for-the-webhook-tests-0123"


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every POST and answers ``status``."""

    def __init__(self, port: int = 0, status: int = 200):
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                receiver.requests.append((dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=abc"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def check_signed(request: tuple[dict[str, str], bytes]) -> dict[str, Any]:
    headers, body = request
    assert headers["Content-Type"] == "application/json"
    assert webhooks.verify(
        SECRET, headers["X-Moejobs-Timestamp"], body, headers["X-Moejobs-Signature"]
    )
    assert not webhooks.verify("another-secret-of-16+", headers["X-Moejobs-Timestamp"], body,
                               headers["X-Moejobs-Signature"])  # fmt: skip
    tampered = body.replace(b'"event":"', b'"event":"x')
    assert not webhooks.verify(
        SECRET, headers["X-Moejobs-Timestamp"], tampered, headers["X-Moejobs-Signature"]
    )
    return dict(json.loads(body))
