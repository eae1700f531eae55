"""The stub engine (``worker.stub``) alone: real subprocesses started as a worker starts the
engine (``python -m worker.entry`` with ``MOEJOBS_ENGINE=stub``), real files, real signals, a
real heartbeat pipe. Every process runs with an import guard that makes importing torch,
LitGPT or Lightning fail and reports any such module left in ``sys.modules`` at exit.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from service import contract
from service.config.plan import training_plan
from service.config.validate import validate_configs
from service.contract import EngineResult, EventKind, ExitCode, FailureReason, Outcome
from tests.support import REPO
from tests.support.tiny import TINY_MODEL, stdlib_text_files, tiny_train_config
from worker import checkpoint as ckpt
from worker.metrics import read_metrics

#: Runs worker.entry like ``python -m`` with torch, litgpt and lightning unimportable; exit 99
#: (and a line naming them) if any of them was imported or an import was attempted anyway.
GUARD = r"""
import os, runpy, sys
BLOCKED = ("torch", "litgpt", "lightning")
tried = []
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            tried.append(name)
            raise ImportError(f"the stub engine must not import {name}")
        return None
sys.meta_path.insert(0, Block())
sys.argv = ["worker.entry", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("worker.entry", run_name="__main__", alter_sys=True)
except SystemExit as stop:
    code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
except BaseException:
    import traceback
    traceback.print_exc()
    code = 1
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
if tried or loaded:
    sys.stderr.write(f"IMPORT GUARD: tried {tried}, loaded {loaded}\n")
    sys.stderr.flush()
    os._exit(99)
sys.stdout.flush(); sys.stderr.flush()
os._exit(code)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stubdata")
    stdlib_text_files(root / "corpus" / "train", ["csv"])
    stdlib_text_files(root / "corpus" / "val", ["heapq"])
    return root


def _configs(
    folder: Path, data: Path, *, steps: int, save_interval: int | None = 3, **train
) -> tuple[Path, Path, Path]:
    """Write train.yaml / model.yaml for a tiny run of ``steps`` steps; returns (out, t, m)."""
    out = folder / "run" / "out"
    doc = tiny_train_config(
        out,
        data / "corpus",
        data / "tokenizer",
        max_tokens=4 * 32 * steps,
        save_interval=save_interval,
        **train,
    )
    folder.mkdir(parents=True, exist_ok=True)
    t, m = folder / "train.yaml", folder / "model.yaml"
    t.write_text(yaml.safe_dump(doc))
    m.write_text(yaml.safe_dump(copy.deepcopy(TINY_MODEL)))
    return out, t, m


def _start(
    t: Path,
    m: Path,
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    extra: Sequence[str] = (),
) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MOEJOBS_")}
    full.update(
        {"MOEJOBS_ENGINE": "stub", "MOEJOBS_STUB_STEP_SECONDS": "0.01", "PYTHONPATH": str(REPO)}
    )
    full.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-c", GUARD, "--train-config", str(t), "--model-config", str(m), *extra],
        cwd=cwd,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=pass_fds,
    )


def _run(
    t: Path, m: Path, *, cwd: Path, env: dict[str, str] | None = None, extra: Sequence[str] = ()
) -> tuple[int, str, str]:
    proc = _start(t, m, cwd=cwd, env=env, extra=extra)
    out, err = proc.communicate(timeout=60)
    assert "IMPORT GUARD" not in err, err
    return proc.returncode, out, err


def _wait(predicate, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the stub exited early with {proc.returncode}: {err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail("timed out waiting for the stub")
        time.sleep(0.005)


def _rows(out: Path) -> list[int]:
    path = out / contract.METRICS_FILE
    return [int(r["step"]) for r in read_metrics(path)] if path.is_file() else []


def _events(out: Path) -> list[str]:
    return [e.event.value for e in contract.read_events(out)]


def _step_folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if contract.checkpoint_step(p.name) is not None)


def test_a_full_run_follows_the_contract_without_torch(tmp_path, data):
    out, t, m = _configs(tmp_path, data, steps=7, save_interval=3)
    code, stdout, err = _run(t, m, cwd=tmp_path)
    assert code == ExitCode.OK, err

    rows = read_metrics(out / "metrics.csv")
    assert tuple(rows[0]) == contract.METRICS_HEADER
    assert [int(r["step"]) for r in rows] == list(range(1, 8))
    validated = validate_configs(yaml.safe_load(t.read_text()), yaml.safe_load(m.read_text()))
    plan = training_plan(validated.train, validated.model)
    assert [int(r["tokens"]) for r in rows] == [plan.tokens_per_step * s for s in range(1, 8)]
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx(
        [plan.learning_rate(s, 3e-3, 3e-4) for s in range(1, 8)], rel=1e-5
    )
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1]
    # deterministic: a second run elsewhere writes the same values
    out2, t2, m2 = _configs(tmp_path / "again", data, steps=7, save_interval=3)
    assert _run(t2, m2, cwd=tmp_path)[0] == 0
    assert read_metrics(out2 / "metrics.csv") == rows

    router = read_metrics(out / "router.csv")
    assert tuple(router[0]) == contract.ROUTER_HEADER
    assert len(router) == 7 * TINY_MODEL["n_layer"] * TINY_MODEL["n_expert"]
    for step in range(1, 8):
        for layer in range(TINY_MODEL["n_layer"]):
            total = sum(
                float(r["fraction"])
                for r in router
                if int(r["step"]) == step and int(r["layer"]) == layer
            )
            assert total == pytest.approx(1.0, abs=1e-5)

    assert _step_folders(out) == ["step-00000003", "step-00000006"]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    for name, step in (("step-00000003", 3), ("step-00000006", 6), ("final", 7)):
        info = ckpt.read_checkpoint(out / name)
        assert info is not None and info.step == step, name
        assert info.meta["tokens"] == plan.tokens_per_step * step
        assert info.meta["samples"] == 4 * step
    assert yaml.safe_load((out / "final" / "model_config.yaml").read_text()) == TINY_MODEL

    result = EngineResult.read(out)
    assert result is not None and result.outcome == Outcome.succeeded
    assert (result.exit_code, result.steps, result.planned_steps, result.tokens) == (
        0,
        7,
        7,
        plan.tokens_per_step * 7,
    )
    assert result.checkpoint == str(out / "final") and result.stopped_by == "completed"
    assert _events(out) == [
        "started",
        "configured",
        "data_ready",
        "model_built",
        "first_step",
        "checkpoint_written",
        "checkpoint_written",
        "checkpoint_written",
        "finished",
    ]
    assert json.loads(stdout.strip().splitlines()[-1])["steps"] == 7

    # nothing left: a run again finds final/ at the planned step and returns at once
    code, _, err = _run(t, m, cwd=tmp_path)
    assert code == 0, err
    again = EngineResult.read(out)
    assert again.stopped_by == "nothing_to_do" and again.steps == 7
    assert _rows(out) == list(range(1, 8))


def test_sigterm_checkpoints_at_a_step_boundary_and_a_rerun_resumes(tmp_path, data):
    out, t, m = _configs(tmp_path, data, steps=40, save_interval=None)
    proc = _start(t, m, cwd=tmp_path, env={"MOEJOBS_STUB_STEP_SECONDS": "0.05"})
    _wait(lambda: len(_rows(out)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    stopped = _rows(out)[-1]
    assert 3 <= stopped < 40
    assert _step_folders(out) == [contract.step_dir_name(stopped)]
    result = EngineResult.read(out)
    assert result.outcome == Outcome.interrupted and result.steps == stopped
    assert result.stopped_by == "SIGTERM" and result.exit_code == 75
    assert "error: interrupted: stopped by SIGTERM after optimizer step" in err
    assert _events(out)[-3:] == ["stop_requested", "checkpoint_written", "finished"]

    code, _, err = _run(t, m, cwd=tmp_path)
    assert code == 0, err
    assert f"resuming from {out / contract.step_dir_name(stopped)} (step {stopped})" in err
    assert _rows(out) == list(range(1, 41))  # every step once
    assert EngineResult.read(out).steps == 40


def test_resume_auto_drops_rows_past_the_checkpoint(tmp_path, data):
    """A process killed between checkpoints (SIGKILL, injected) left rows past its last
    checkpoint: the next one keeps rows up to the checkpoint and trains the rest again."""
    out, t, m = _configs(tmp_path, data, steps=12, save_interval=4)
    code, _, err = _run(t, m, cwd=tmp_path, env={"MOEJOBS_STUB_FAIL": "kill@7"})
    assert code == -signal.SIGKILL, err
    assert _rows(out) == list(range(1, 7)) and _step_folders(out) == ["step-00000004"]
    assert EngineResult.read(out) is None  # killed: no result
    code, _, err = _run(t, m, cwd=tmp_path, env={"MOEJOBS_STUB_FAIL": "kill@7:1"})
    assert code == 0, err  # the fault was for attempt 1 only (this one has no attempt)
    assert _rows(out) == list(range(1, 13))
    assert _step_folders(out) == ["step-00000004", "step-00000008", "step-00000012"]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_before_training_started_is_one_line(tmp_path, data, signum, code):
    out, t, m = _configs(tmp_path, data, steps=5)
    proc = _start(t, m, cwd=tmp_path, env={"MOEJOBS_STUB_START_SECONDS": "30"})
    _wait(lambda: "data_ready" in _events(out), proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == code, err
    assert err.strip().splitlines() == ["interrupted before training started"]
    assert not (out / "metrics.csv").exists() and _step_folders(out) == []
    result = EngineResult.read(out)
    assert result.outcome == Outcome.interrupted and result.exit_code == code
    assert result.steps == 0 and result.stopped_by == signal.Signals(signum).name
    assert _events(out)[-2:] == ["stop_requested", "finished"]


@pytest.mark.parametrize(
    "fault, reason, text",
    [
        ("crash@3", FailureReason.crashed, "RuntimeError: injected crash at step 3"),
        ("oom@3", FailureReason.out_of_memory, "MemoryError: injected out of memory at step 3"),
        ("nospace@3", FailureReason.no_space, "metrics.csv ("),
    ],
)
def test_injected_faults_are_reported_with_their_reason(tmp_path, data, fault, reason, text):
    out, t, m = _configs(tmp_path, data, steps=6)
    code, _, err = _run(t, m, cwd=tmp_path, env={"MOEJOBS_STUB_FAIL": fault})
    assert code == ExitCode.FAILED, err
    result = EngineResult.read(out)
    assert result.outcome == Outcome.failed and result.reason == reason
    assert text in result.message and result.steps == 2
    assert err.strip().splitlines()[-1] == f"error: {reason.value}: {result.message}"
    assert _rows(out) == [1, 2]
    if reason == FailureReason.no_space:
        assert "MiB free" in result.message


def test_invalid_config_and_invalid_fault_spec_exit_2(tmp_path, data):
    out, t, m = _configs(tmp_path, data, steps=4)
    doc = yaml.safe_load(t.read_text())
    doc["train"]["micro_batch_szie"] = 3
    t.write_text(yaml.safe_dump(doc))
    code, _, err = _run(t, m, cwd=tmp_path)
    assert code == ExitCode.INVALID_CONFIG
    assert "train.micro_batch_szie" in err
    result = EngineResult.read(out)
    assert result.reason == FailureReason.invalid_config
    assert "train.micro_batch_szie" in result.message

    out, t, m = _configs(tmp_path / "b", data, steps=4)
    code, _, err = _run(t, m, cwd=tmp_path, env={"MOEJOBS_STUB_FAIL": "explode@2"})
    assert code == ExitCode.INVALID_CONFIG
    assert "MOEJOBS_STUB_FAIL: 'explode@2'" in EngineResult.read(out).message

    out, t, m = _configs(tmp_path / "c", data, steps=4)
    (data / "empty").mkdir(exist_ok=True)
    doc = yaml.safe_load(t.read_text())
    doc["data"]["init_args"]["train_data_path"] = str(data / "empty")
    t.write_text(yaml.safe_dump(doc))
    code, _, err = _run(t, m, cwd=tmp_path)
    assert code == ExitCode.FAILED
    assert EngineResult.read(out).reason == FailureReason.invalid_data


def test_silent_worker_fences_the_stub(tmp_path, data):
    """A heartbeat pipe that goes quiet: the stub stops itself (exit 76) and writes nothing
    after that, not even result.json; while bytes come it trains on."""
    out, t, m = _configs(tmp_path, data, steps=1000, save_interval=2)
    read_fd, write_fd = os.pipe()
    contract.write_owner(out, 3, "w1")
    proc = _start(
        t,
        m,
        cwd=tmp_path,
        pass_fds=(read_fd,),
        env={
            contract.ENV_WATCHDOG_FD: str(read_fd),
            contract.ENV_TRAINER_DEADLINE: "1.5",
            contract.ENV_CHECKPOINT_WRITE: "0.5",
            contract.ENV_ATTEMPT: "3",
            "MOEJOBS_STUB_STEP_SECONDS": "0.02",
        },
    )
    os.close(read_fd)
    try:
        beat_until = time.monotonic() + 3.0
        while time.monotonic() < beat_until:  # a healthy worker: a byte every 0.1 s
            os.write(write_fd, b".")
            last_beat = time.monotonic()
            time.sleep(0.1)
            assert proc.poll() is None, proc.communicate()[1]
        _, err = proc.communicate(timeout=60)
        gone_at = time.monotonic()
    finally:
        os.close(write_fd)
    assert proc.returncode == ExitCode.FENCED, err
    assert gone_at - last_beat >= 1.5  # not before the deadline after the last byte
    assert "error: fenced: no heartbeat from the worker" in err
    assert EngineResult.read(out) is None
    events = contract.read_events(out)
    assert events[-1].event == EventKind.fenced and events[-1].attempt == 3
    assert all(e.attempt == 3 for e in events)
    # nothing renamed into place after the fencing: the last checkpoint is at or before the
    # last metrics row, and no temporary folder is left over
    last_ckpt = max(contract.checkpoint_step(n) for n in _step_folders(out))
    assert last_ckpt <= _rows(out)[-1]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_another_owner_stops_the_stub_before_its_next_rename(tmp_path, data):
    """The owner file names another attempt: the stub's next checkpoint is not renamed into
    place and it exits 76 (no watchdog pipe: the check at the rename does it)."""
    out, t, m = _configs(tmp_path, data, steps=1000, save_interval=5)
    contract.write_owner(out, 1, "w1")
    proc = _start(
        t, m, cwd=tmp_path, env={contract.ENV_ATTEMPT: "1", "MOEJOBS_STUB_STEP_SECONDS": "0.05"}
    )
    _wait(lambda: "step-00000005" in _step_folders(out), proc)
    contract.write_owner(out, 2, "w2")
    taken = _step_folders(out)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == ExitCode.FENCED, err
    assert "attempt 2 on worker w2 owns" in err
    # at most the checkpoint whose rename was already under way when the owner changed
    assert len(_step_folders(out)) <= len(taken) + 1
    assert EngineResult.read(out) is None


def test_a_full_disk_is_no_space(tmp_path, data):
    """A real ENOSPC: out_dir on a 1 MiB tmpfs, placeholder weights of 2 MiB."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        out, t, m = _configs(mnt, data, steps=6, save_interval=2)
        code, _, err = _run(
            t, m, cwd=tmp_path, env={"MOEJOBS_STUB_CHECKPOINT_BYTES": str(2 * 2**20)}
        )
        assert code == ExitCode.FAILED, err
        result = EngineResult.read(out)
        assert result.reason == FailureReason.no_space
        assert ".tmp-step-00000002-" in result.message and "lit_model.pth" in result.message
        assert "MiB free" in result.message
        assert _step_folders(out) == []
        assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
