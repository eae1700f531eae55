"""Ctrl-C on ``run_train.py`` as a terminal delivers it, and signals before training starts.

``uv run python run_train.py`` receives two SIGINTs for one Ctrl-C (the terminal signals the
whole foreground group and ``uv run`` forwards it once more): that must still checkpoint and exit
75. A second Ctrl-C later than that still aborts at once, and a signal before the first optimizer
step (from the first instant: during imports, data preparation, model build) prints one line,
exits 130/143 and trains nothing. The start-up case used to fail on a loaded machine; run it
under load with e.g. two ``python3 -c 'while True: pass' &`` beside pytest.
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

from service.contract import EngineResult, EventKind, Outcome, read_events
from tests.support import REPO
from tests.support.tiny import TINY_MODEL, tiny_train_config
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


#: The two command lines that train in the terminal: run_train.py and `moejobs train`.
COMMANDS = {"run_train.py": ["run_train.py"], "moejobs train": ["-m", "cli.main", "train"]}


def _run_train(t: Path, m: Path, command: str = "run_train.py") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *COMMANDS[command], "--config", str(t), "--model-config", str(m)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(
    predicate, proc: subprocess.Popen, timeout: float = 300.0, poll: float = 0.02
) -> None:
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
    _wait_for(
        lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc
    )  # step 2
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
    result = EngineResult.read(out)
    assert (result.outcome, result.exit_code, result.stopped_by) == (
        Outcome.interrupted,
        75,
        "SIGINT",
    )
    assert (Path(result.checkpoint), result.steps) == (stopped.path, stopped.step)
    stops = [e for e in read_events(out) if e.event == EventKind.stop_requested]
    assert [e.message for e in stops] == [
        "SIGINT"
    ]  # the repeat of the same Ctrl-C is not a second stop


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
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_ctrl_c_before_training_starts_is_one_line_exit_130(
    tmp_path, corpus, tokenizer_dir, command
):
    """SIGINT while torch is being imported (the moment a loaded machine used to lose it):
    run_train.py and `moejobs train` installed their handlers before importing anything heavy,
    so the signal ends the process at once: 130, exactly one line, result.json says
    interrupted, nothing trained."""
    out, t, m = _configs(tmp_path, corpus, tokenizer_dir)
    proc = _run_train(t, m, command)
    # torch's shared library is mapped: main() is importing the engine
    maps = Path(f"/proc/{proc.pid}/maps")
    _wait_for(lambda: "libtorch" in maps.read_text(), proc, timeout=120, poll=0.005)
    assert _catches(proc.pid, signal.SIGINT) and _catches(proc.pid, signal.SIGTERM), (
        f"{command}'s early handlers are not installed"
    )
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    # the config's warnings come first (run_train.py prints them); then the signal's one line
    lines = [
        ln for ln in err.strip().splitlines() if ln != "warnings:" and not ln.startswith("  - ")
    ]
    assert lines == ["interrupted before training started"], err[-3000:]
    assert not (out / "metrics.csv").exists() and not ckpt.list_checkpoints(out)
    result = EngineResult.read(out)
    assert result is not None, "no result.json"
    assert (result.outcome, result.exit_code, result.stopped_by, result.steps) == (
        Outcome.interrupted,
        130,
        "SIGINT",
        0,
    )
    assert result.message == "interrupted before training started" and result.reason is None


@pytest.mark.slow
def test_sigterm_during_initial_validation_is_143_through_worker_entry(
    tmp_path, corpus, tokenizer_dir
):
    """The worker's entry (python -m worker.entry): SIGTERM after the model is built but before the
    first optimizer step (here: a long initial validation) exits 143 with the one line; the
    events say how far it got; no step, no checkpoint."""
    out = tmp_path / "run"
    doc = tiny_train_config(out, corpus, tokenizer_dir, max_tokens=4 * 32 * STEPS, save_interval=1)
    doc["eval"] = {
        "interval": 0,
        "initial_validation": True,
        "final_validation": False,
        "max_iters": 100000,
    }
    t, m = tmp_path / "train.yaml", tmp_path / "model.yaml"
    t.write_text(yaml.safe_dump(doc))
    m.write_text(yaml.safe_dump(TINY_MODEL))
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.entry", "--train-config", str(t), "--model-config", str(m)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(
        lambda: EventKind.model_built in {e.event for e in read_events(out)}, proc, poll=0.005
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted before training started", err[-3000:]
    assert err.count("interrupted before training started") == 1 and "Traceback" not in err
    kinds = [
        e.event for e in read_events(out) if e.event != EventKind.data_progress
    ]  # only when it tokenized
    assert kinds == [
        EventKind.started,
        EventKind.configured,
        EventKind.data_ready,
        EventKind.model_built,
        EventKind.finished,
    ], kinds
    result = EngineResult.read(out)
    assert (
        result.outcome,
        result.exit_code,
        result.stopped_by,
        result.steps,
        result.checkpoint,
    ) == (Outcome.interrupted, 143, "SIGTERM", 0, None)
    assert result.planned_steps == STEPS
    assert not ckpt.list_checkpoints(out) and not [
        p for p in out.iterdir() if p.name.startswith(".tmp")
    ]
    assert not (out / "metrics.csv").exists() or read_metrics(out / "metrics.csv") == []
