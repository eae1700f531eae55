"""``moejobs up`` stopped by SIGTERM (``kill``, ``timeout``, ``docker stop``, systemd) does the
same orderly stop as Ctrl-C: the API and the worker, which run in process groups of their own
and so never see a signal sent to ``up``, are stopped, and the port is free again.

No training runs here: the stack starts, answers /readyz, and is stopped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support import REPO
from tests.support.client import free_port

pytestmark = pytest.mark.slow


def _children(pid: int) -> set[int]:
    """PIDs of the direct children of ``pid`` (every thread's list, from /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.update(int(p) for p in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _start_up(tmp_path: Path) -> tuple[subprocess.Popen, int, Path]:
    home, port = tmp_path / "home", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEJOBS_")}
    env.update(PYTHONUNBUFFERED="1", MOEJOBS_TOKEN_CACHE=str(tmp_path / "token-cache"))
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        # A session of its own: the test's signal goes to `up` only, as `kill PID` does.
        up = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "up", "--home", str(home), "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 240
    while True:  # `up` says it serves after its own /readyz check passed
        assert up.poll() is None, log_path.read_text()
        if "serving until" in log_path.read_text():
            break
        if time.monotonic() > deadline:
            os.killpg(up.pid, signal.SIGKILL)
            pytest.fail("moejobs up was not ready in 240 s:\n" + log_path.read_text())
        time.sleep(0.5)
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    return up, port, log_path


def test_sigterm_stops_up_and_its_children(tmp_path):
    up, port, log_path = _start_up(tmp_path)
    children = _children(up.pid)
    try:
        assert len(children) == 3, (children, log_path.read_text())  # the API and two workers
        up.send_signal(signal.SIGTERM)  # to `up` alone, not its group: what `kill PID` does
        try:
            code = up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("moejobs up did not exit within 120 s of SIGTERM:\n" + log_path.read_text())
        output = log_path.read_text()
        assert code == 0, output
        assert "stopping" in output and "Traceback" not in output, output
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if _alive(pid)], f"children left running: {children}"
        assert _port_is_free(port)
    finally:
        for pid in children | {up.pid}:
            if _alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
