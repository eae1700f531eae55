"""Ctrl-C on ``run_train.py`` as a terminal delivers it.

``uv run python run_train.py`` receives two SIGINTs for one Ctrl-C (the terminal signals the
whole foreground group and ``uv run`` forwards it once more): that must still checkpoint and exit
75. A second Ctrl-C later than that still aborts at once, and a Ctrl-C before training starts
prints one line, not a traceback.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_MODEL, tiny_train_config
from worker import checkpoint as ckpt
from worker.metrics import read_metrics
from worker.train import StopFlag

STEPS = 400


def _configs(tmp_path: Path, corpus: Path, tokenizer_dir: Path) -> tuple[Path, Path, Path]:
    out = tmp_path / "run"
    doc = tiny_train_config(out, corpus, tokenizer_dir, max_tokens=4 * 32 * STEPS)
    t, m = tmp_path / "train.yaml", tmp_path / "model.yaml"
    t.write_text(yaml.safe_dump(doc))
    m.write_text(yaml.safe_dump(TINY_MODEL))
    return out, t, m


def _run_train(t: Path, m: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "run_train.py", "--config", str(t), "--model-config", str(m)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"run_train.py exited early with {proc.returncode}: {err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail("timed out waiting for run_train.py")
        time.sleep(poll)


def _caught_signals(pid: int) -> int:
    """The process's mask of signals with a handler (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


def _catches(pid: int, sig: int) -> bool:
    return bool(_caught_signals(pid) & (1 << (sig - 1)))


@pytest.mark.slow
def test_one_ctrl_c_delivered_twice_checkpoints_and_exits_75(tmp_path, corpus, tokenizer_dir):
    out, t, m = _configs(tmp_path, corpus, tokenizer_dir)
    proc = _run_train(t, m)
    metrics = out / "metrics.csv"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc)  # step 2
    proc.send_signal(signal.SIGINT)  # the terminal's
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # uv run's forward of the same Ctrl-C
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "error: interrupted: stopped by SIGINT after optimizer step" in err
    stopped = ckpt.latest_checkpoint(out)
    assert stopped is not None and stopped.path.name == ckpt.step_dir_name(stopped.step)
    assert int(read_metrics(metrics)[-1]["step"]) == stopped.step < STEPS


def test_a_later_second_sigint_still_aborts_at_once():
    """Real signals to this process: one repeated within the window is ignored, one after it
    raises KeyboardInterrupt (double Ctrl-C)."""
    flag = StopFlag()
    flag.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs between bytecodes; give it the chance
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert flag.signal == signal.SIGINT
        time.sleep(StopFlag.SAME_INTERRUPT_SECONDS)
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    finally:
        flag.restore()


@pytest.mark.slow
def test_ctrl_c_before_training_starts_is_one_line_exit_130(tmp_path, corpus, tokenizer_dir):
    _, t, m = _configs(tmp_path, corpus, tokenizer_dir)
    proc = _run_train(t, m)
    # torch's shared library is mapped: main() is importing the engine, whose handlers (the only
    # SIGTERM handler in the process) are not installed yet
    maps = Path(f"/proc/{proc.pid}/maps")
    _wait_for(lambda: "libtorch" in maps.read_text(), proc, timeout=120, poll=0.005)
    assert not _catches(proc.pid, signal.SIGTERM), "the engine's handlers are already installed"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted before training started", err[-3000:]
    assert "Traceback" not in err
