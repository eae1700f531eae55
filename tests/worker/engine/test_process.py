"""The engine as a process: kill -9 then resume, SIGTERM (exit 75) then resume, and
data-parallel training with 2 CPU ranks (in-process and through run_train.py)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from service.config.validate import validate_configs
from tests.support import REPO
from tests.support.tiny import TINY_MODEL, tiny_train_config
from worker import checkpoint as ckpt
from worker.metrics import read_metrics
from worker.train import run_training

pytestmark = pytest.mark.slow

STEPS = 40


def _write_configs(tmp_path: Path, train_doc: dict, model_doc: dict) -> tuple[Path, Path]:
    t, m = tmp_path / "train.yaml", tmp_path / "model.yaml"
    t.write_text(yaml.safe_dump(train_doc))
    m.write_text(yaml.safe_dump(model_doc))
    return t, m


def _engine_cmd(t: Path, m: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "worker.train",
        "--train-config",
        str(t),
        "--model-config",
        str(m),
    ]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited early with {proc.returncode}: {err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the training process")
        time.sleep(0.02)


def _long_run(tmp_path: Path, corpus: Path, tokenizer_dir: Path) -> tuple[Path, Path, Path]:
    out = tmp_path / "run"
    doc = tiny_train_config(out, corpus, tokenizer_dir, max_tokens=4 * 32 * STEPS, save_interval=4)
    t, m = _write_configs(tmp_path, doc, TINY_MODEL)
    return out, t, m


def _assert_steps_once(out: Path) -> list[int]:
    steps = [int(r["step"]) for r in read_metrics(out / "metrics.csv")]
    assert steps == list(range(1, STEPS + 1)), steps
    return steps


def test_kill_9_after_first_checkpoint_then_resume(tmp_path, corpus, tokenizer_dir):
    out, t, m = _long_run(tmp_path, corpus, tokenizer_dir)
    proc = subprocess.Popen(
        _engine_cmd(t, m), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for(lambda: (out / "step-00000004").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = ckpt.latest_checkpoint(out)
    assert resumed_from is not None and resumed_from.step >= 4 and not (out / "final").exists()
    rows_at_kill = [int(r["step"]) for r in read_metrics(out / "metrics.csv")]
    assert rows_at_kill[: resumed_from.step] == list(range(1, resumed_from.step + 1))

    again = subprocess.run(_engine_cmd(t, m), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {resumed_from.path} (step {resumed_from.step})" in again.stderr
    _assert_steps_once(out)  # the steps continue: every step exactly once, none repeated
    assert ckpt.read_checkpoint(out / "final").step == STEPS
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_sigterm_writes_a_resumable_checkpoint_and_exits_75(tmp_path, corpus, tokenizer_dir):
    out, t, m = _long_run(tmp_path, corpus, tokenizer_dir)
    proc = subprocess.Popen(
        _engine_cmd(t, m), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = out / "metrics.csv"
    _wait_for(
        lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc
    )  # step 2 done
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "error: interrupted: stopped by SIGTERM after optimizer step" in err
    stopped = ckpt.latest_checkpoint(out)
    assert stopped is not None and stopped.path.name == ckpt.step_dir_name(stopped.step)
    assert int(read_metrics(metrics)[-1]["step"]) == stopped.step < STEPS

    again = subprocess.run(_engine_cmd(t, m), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {stopped.path}" in again.stderr
    _assert_steps_once(out)


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final" / "lit_model.pth", weights_only=True)


def test_two_cpu_ranks_equal_one_rank_with_accumulation(tmp_path, corpus, tokenizer_dir):
    """2 ranks x 1 micro-batch per step (DDP, gloo) and 1 rank x 2 accumulated micro-batches see
    the same samples in every step, so they reach the same weights."""
    base = tiny_train_config(tmp_path / "one", corpus, tokenizer_dir, max_tokens=4 * 32 * 4)
    two = copy.deepcopy(base)
    two["out_dir"], two["devices"] = str(tmp_path / "two"), 2
    v1, v2 = validate_configs(base, TINY_MODEL), validate_configs(two, TINY_MODEL)
    r1 = run_training(v1.train, v1.model)
    rows: list[dict] = []
    r2 = run_training(v2.train, v2.model, on_row=lambda row, plan: rows.append(row))
    assert r1.steps == r2.steps == 4 and r1.tokens == r2.tokens == 512
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    a, b = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    la = [float(r["loss"]) for r in read_metrics(tmp_path / "one" / "metrics.csv")]
    lb = [float(r["loss"]) for r in read_metrics(tmp_path / "two" / "metrics.csv")]
    assert la == pytest.approx(lb, rel=1e-4)
    # the environment of this process is as it was (no leftover LOCAL_RANK making a later run hang)
    assert "LOCAL_RANK" not in os.environ and "MASTER_PORT" not in os.environ


def test_two_ranks_from_run_train_py(tmp_path, corpus, tokenizer_dir):
    doc = tiny_train_config(tmp_path / "cli", corpus, tokenizer_dir, max_tokens=4 * 32 * 3)
    t, m = _write_configs(tmp_path, doc, TINY_MODEL)
    proc = subprocess.run(
        [
            sys.executable,
            "run_train.py",
            "--config",
            str(t),
            "--model-config",
            str(m),
            "--devices",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [int(r["step"]) for r in read_metrics(tmp_path / "cli" / "metrics.csv")] == [1, 2, 3]
    log = (tmp_path / "cli" / "train.log").read_text()
    assert "2 rank(s)" in log
    # the engine's log lines are on the console too, once each (rank 1 logs warnings only)
    for line in (
        "plan: 3 optimizer steps",
        "attention: SDPA with enable_gqa",
        f"checkpoint {tmp_path / 'cli' / 'final'} written (step 3)",
    ):
        assert line in log and proc.stderr.count(line) == 1, line
    summary = dict(line.split(" : ", 1) for line in proc.stdout.splitlines() if " : " in line)
    assert summary["  optimizer steps"].strip() == "3"
    assert Path(summary["  log            "].strip()) == tmp_path / "cli" / "train.log"
