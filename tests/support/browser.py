"""A headless Chromium driven over the DevTools protocol for the dashboard tests (no tests here).

The system's Chromium (Debian's ``chromium``) is started with ``--remote-debugging-pipe``: the
protocol's JSON messages, each ended by a NUL byte, go to its fd 3 and come back on its fd 4, so
no WebSocket library and no download is needed. :class:`Browser` opens one page, runs
expressions in it (``evaluate``, ``wait_for``), accepts ``confirm()`` dialogs, and records
console errors, uncaught exceptions and the browser's log entries (Content-Security-Policy
violations among them) in ``problems``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)


class BrowserError(AssertionError):
    """The page did not do what a test waited for, or the protocol answered an error."""


class Browser:
    """One headless Chromium and one page of it (see the module docstring)."""

    def __init__(self, width: int = 1280, height: int = 1600) -> None:
        assert CHROMIUM is not None, "no Chromium installed"
        self._profile = tempfile.mkdtemp(prefix="moejobs-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire_fds() -> None:  # in the child: the protocol's fds 3 (in) and 4 (out)
            # via copies above 10, in case either end is itself fd 3 or 4
            read_end = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        self._proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--remote-debugging-pipe",
                f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire_fds,
            close_fds=False,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._next_id = 0
        self._answers: dict[int, dict] = {}
        self._cond = threading.Condition()
        self.problems: list[str] = []
        self._session: str | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")

    # -- the protocol

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_child, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._cond.notify_all()
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                self._dispatch(json.loads(raw))

    def _dispatch(self, message: dict) -> None:
        if "id" in message:
            with self._cond:
                self._answers[message["id"]] = message
                self._cond.notify_all()
            return
        method, params = message.get("method"), message.get("params", {})
        if method == "Page.javascriptDialogOpening":
            threading.Thread(
                target=self.call, args=("Page.handleJavaScriptDialog", {"accept": True})
            ).start()
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            texts = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
            self.problems.append("console.error: " + " ".join(texts))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.problems.append(f"uncaught: {text} ({details.get('url')})")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error" or "Content Security Policy" in entry.get("text", ""):
                self.problems.append(f"log ({entry.get('source')}): {entry.get('text')}")

    def _call(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        with self._cond:
            self._next_id += 1
            ident = self._next_id
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if self._session is not None:
            message["sessionId"] = self._session
        os.write(self._to_child, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cond:
            while ident not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0 or self._proc.poll() is not None:
                    raise BrowserError(f"no answer to {method}")
                self._cond.wait(left)
            answer = self._answers.pop(ident)
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def call(self, method: str, params: dict | None = None) -> dict:
        """One protocol command to the page; its result."""
        return self._call(method, params)

    # -- the page

    def goto(self, url: str) -> None:
        """Load ``url`` (a full load: the module graph runs again)."""
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 20) -> Any:
        """Poll ``expression`` until it is truthy; its value (``True`` for a DOM node). Fails
        after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        probe = f"(() => {{ const v = ({expression}); return v instanceof Node ? true : v; }})()"
        while True:
            value = self.evaluate(probe)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"timed out waiting for {expression}; problems: {self.problems}")
            time.sleep(0.1)

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        os.close(self._to_child)
        self._reader.join(timeout=5)
        os.close(self._from_child)
        shutil.rmtree(self._profile, ignore_errors=True)


@contextmanager
def browser(width: int = 1280, height: int = 1600) -> Iterator[Browser]:
    """A :class:`Browser`, closed afterwards."""
    b = Browser(width, height)
    try:
        yield b
    finally:
        b.close()
