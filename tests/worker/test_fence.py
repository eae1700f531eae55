"""worker.fence on its own: a real pipe, a real owner file, and an ``exit`` callback that records
instead of ending pytest. Torch-free, a few seconds in all."""

from __future__ import annotations

import os
import threading
import time

import pytest

from service import contract
from worker.fence import Fence, Fenced

FENCED = int(contract.ExitCode.FENCED)


class Exits:
    """The fence's ``exit``: records the code and when it was called."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.at: float | None = None
        self.called = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.at = time.monotonic()
        self.called.set()


@pytest.fixture
def pipe():
    r, w = os.pipe()
    ends = {"r": r, "w": w}
    yield ends
    for fd in ends.values():
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass


def _fence(tmp_path, pipe, exits, **kwargs) -> Fence:
    kwargs.setdefault("deadline", 0.4)
    kwargs.setdefault("write_allowance", 1.0)
    return Fence(tmp_path, fd=pipe["r"], exit=exits, **kwargs)


def test_heartbeats_keep_it_alive_and_silence_past_the_deadline_fences(tmp_path, pipe):
    exits = Exits()
    guard = _fence(tmp_path, pipe, exits, attempt=3).start()
    try:
        for _ in range(12):  # 1.2 s of beats, three deadlines' worth
            os.write(pipe["w"], b".")
            silent_from = time.monotonic()
            time.sleep(0.1)
        assert not exits.called.is_set() and not guard.fenced
        assert exits.called.wait(5), "not fenced after the worker went silent"
        assert exits.codes == [FENCED]
        assert exits.at - silent_from >= 0.4  # not before the deadline
        assert "no heartbeat from the worker" in guard.reason
        with pytest.raises(Fenced, match="no heartbeat"):  # no write starts any more
            with guard.writing():
                pass
        events = contract.read_events(tmp_path)
        assert [(e.event, e.attempt) for e in events] == [(contract.EventKind.fenced, 3)]
        assert "no heartbeat" in events[0].message
    finally:
        guard.stop()


def test_a_closed_pipe_fences_at_once(tmp_path, pipe):
    exits = Exits()
    guard = _fence(tmp_path, pipe, exits, deadline=30.0).start()
    try:
        os.close(pipe["w"])
        pipe["w"] = None
        assert exits.called.wait(5)
        assert exits.codes == [FENCED] and "pipe closed" in guard.reason
    finally:
        guard.stop()


def test_another_owner_fences(tmp_path, pipe):
    exits = Exits()
    contract.write_owner(tmp_path, 5, "worker-a")
    guard = _fence(tmp_path, pipe, exits, attempt=5, deadline=30.0).start()
    try:
        beats = threading.Event()

        def beat():
            while not beats.is_set():
                os.write(pipe["w"], b".")
                time.sleep(0.1)

        threading.Thread(target=beat, daemon=True).start()
        time.sleep(1.3)  # at least one owner check passed with this attempt as the owner
        assert not exits.called.is_set()
        guard.check_commit()  # still ours
        contract.write_owner(tmp_path, 6, "worker-b")
        assert exits.called.wait(5), "not fenced after another attempt took the folder"
        beats.set()
        assert exits.codes == [FENCED]
        assert "attempt 6 on worker worker-b owns" in guard.reason
        with pytest.raises(Fenced, match="attempt 6"):
            guard.check_commit()
    finally:
        guard.stop()


def test_check_commit_refuses_another_owner_without_a_watchdog(tmp_path):
    """run by a worker but without a pipe: the owner file alone still guards the rename."""
    guard = Fence(tmp_path, attempt=2, fd=None, exit=Exits())
    guard.check_commit()  # no owner file: allowed
    contract.write_owner(tmp_path, 2, "w")
    guard.check_commit()
    contract.write_owner(tmp_path, 3, "w")
    with pytest.raises(Fenced, match=r"attempt 3 .* \(this is attempt 2\)"):
        guard.check_commit()
    Fence(tmp_path, attempt=None, exit=Exits()).check_commit()  # not a worker's: no check


def test_a_write_under_way_may_finish_within_the_allowance(tmp_path, pipe):
    exits = Exits()
    guard = _fence(tmp_path, pipe, exits, deadline=0.3, write_allowance=3.0).start()
    try:
        with guard.writing():
            deadline_passed = time.monotonic() + 0.3
            while not guard.fenced:  # the watchdog fires during the write
                time.sleep(0.02)
            assert time.monotonic() >= deadline_passed
            time.sleep(0.3)
            assert not exits.called.is_set(), "exited while a write was under way"
            guard.check_commit()  # within the allowance: the rename may happen
            left_at = time.monotonic()
        assert exits.called.wait(2)
        assert exits.codes == [FENCED]
        assert (
            exits.at - left_at < 1.0
        )  # it exits as soon as the write is done, not at the allowance
        (event,) = contract.read_events(tmp_path)
        assert event.event == contract.EventKind.fenced and 0.3 <= event.data["waited_s"] < 3.0
    finally:
        guard.stop()


def test_check_commit_refuses_once_the_allowance_is_spent(tmp_path, pipe):
    exits = Exits()
    guard = _fence(tmp_path, pipe, exits, deadline=0.2, write_allowance=0.5).start()
    try:
        with guard.writing():
            assert exits.called.wait(5), "the watchdog waited past the allowance"
            fenced_for = time.monotonic() - guard._fenced_at
            assert fenced_for >= 0.5
            with pytest.raises(Fenced, match="outlasted 0.5 s"):
                guard.check_commit()
        assert exits.codes == [FENCED]
    finally:
        guard.stop()


def test_from_env_ignores_a_descriptor_that_is_not_open(tmp_path, monkeypatch, pipe):
    r = pipe["r"]
    monkeypatch.setenv(contract.ENV_WATCHDOG_FD, str(r))
    monkeypatch.setenv(contract.ENV_ATTEMPT, "9")
    monkeypatch.setenv(contract.ENV_TRAINER_DEADLINE, "2.5")
    guard = Fence.from_env(tmp_path)
    assert (guard.fd, guard.attempt, guard.deadline, guard.active) == (r, 9, 2.5, True)
    os.close(r)
    pipe["r"] = None
    guard = Fence.from_env(tmp_path)
    assert guard.fd is None and not guard.active and guard.attempt == 9
