"""The engine's side of ``service.contract``: ``result.json`` and ``events.jsonl`` for each end
the engine can report, from ``python -m worker.entry`` (a real subprocess, as the worker starts
it) and from ``run_train.py``'s ``cli.train.main``, and the one classifier of exceptions.

Cost: one engine subprocess (~10 s, mostly importing torch) and a few in-process tiny runs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.contract import EngineResult, EventKind, FailureReason, Outcome, read_events
from tests.support import REPO
from tests.support.tiny import TINY_MODEL, tiny_train_config
from worker import early, errors
from worker import train as engine


@pytest.fixture(autouse=True)
def _no_leftover_exit_hook(monkeypatch):
    """main() points worker.early's exit hook at its reporter; put it back after each test."""
    monkeypatch.setattr(early, "_early_exit_hook", None)


def _write(tmp_path: Path, doc: dict, model: dict | None = None) -> tuple[Path, Path]:
    t, m = tmp_path / "train.yaml", tmp_path / "model.yaml"
    t.write_text(yaml.safe_dump(doc))
    m.write_text(yaml.safe_dump(model or TINY_MODEL))
    return t, m


@pytest.mark.slow
def test_worker_entry_success_result_and_events(tmp_path, corpus, tokenizer_dir):
    out = tmp_path / "run"
    t, m = _write(
        tmp_path,
        tiny_train_config(out, corpus, tokenizer_dir, max_tokens=4 * 32 * 3, save_interval=2),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "worker.entry", "--train-config", str(t), "--model-config", str(m)],
        cwd=REPO,
        env=dict(os.environ, MOEJOBS_ATTEMPT="7"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = EngineResult.read(out)
    assert (result.outcome, result.reason, result.exit_code, result.attempt) == (
        Outcome.succeeded,
        None,
        0,
        7,
    )
    assert (result.steps, result.planned_steps, result.tokens, result.stopped_by) == (
        3,
        3,
        384,
        "completed",
    )
    assert Path(result.checkpoint) == out / "final" and math.isfinite(result.final_loss)
    assert result.message == "trained 3 optimizer steps (384 tokens)"
    assert result.elapsed_s > 0 and result.finished_at.utcoffset().total_seconds() == 0
    events = [
        e for e in read_events(out) if e.event != EventKind.data_progress
    ]  # only when it tokenized
    assert [e.event for e in events] == [
        EventKind.started,
        EventKind.configured,
        EventKind.data_ready,
        EventKind.model_built,
        EventKind.first_step,
        EventKind.checkpoint_written,
        EventKind.checkpoint_written,
        EventKind.finished,
    ]
    assert {e.attempt for e in events} == {7} and {e.pid for e in events} == {events[0].pid}
    assert [
        (e.step, Path(e.data["path"]).name)
        for e in events
        if e.event == EventKind.checkpoint_written
    ] == [(2, "step-00000002"), (3, "final")]
    assert events[-1].data["outcome"] == "succeeded" and events[-1].step == 3


def test_invalid_config_is_reported_in_the_raw_out_dir(tmp_path, corpus, tokenizer_dir, capsys):
    out = tmp_path / "run"
    doc = tiny_train_config(out, corpus, tokenizer_dir)
    doc["train"]["bogus_key"] = 1
    t, m = _write(tmp_path, doc)
    assert engine.main(["--train-config", str(t), "--model-config", str(m)]) == 2
    result = EngineResult.read(out)
    assert (result.outcome, result.reason, result.exit_code) == (
        Outcome.failed,
        FailureReason.invalid_config,
        2,
    )
    assert result.message.startswith("invalid config: ") and "bogus_key" in result.message
    assert "\n" not in result.message
    assert "error: invalid config" in capsys.readouterr().err
    assert [e.event for e in read_events(out)] == [EventKind.finished]


def test_invalid_config_without_a_usable_out_dir_reports_in_the_working_directory(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    t, m = _write(tmp_path, {"out_dir": 42})
    assert engine.main(["--train-config", str(t), "--model-config", str(m)]) == 2
    result = EngineResult.read(tmp_path)
    assert result.reason == FailureReason.invalid_config and "out_dir" in result.message


def test_invalid_data_is_reported_naming_the_folder(tmp_path, corpus, tokenizer_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    doc = tiny_train_config(out, corpus, tokenizer_dir)
    doc["data"]["init_args"] = {
        "train_data_path": str(empty),
        "val_data_path": None,
        "num_workers": 0,
    }
    t, m = _write(tmp_path, doc)
    assert engine.main(["--train-config", str(t), "--model-config", str(m)]) == 1
    result = EngineResult.read(out)
    assert (result.outcome, result.reason, result.exit_code, result.steps) == (
        Outcome.failed,
        FailureReason.invalid_data,
        1,
        0,
    )
    assert str(empty) in result.message
    assert (
        capsys.readouterr().err.strip().splitlines()[-1] == f"error: invalid_data: {result.message}"
    )
    kinds = [e.event for e in read_events(out)]
    assert kinds == [EventKind.configured, EventKind.finished]


def test_run_train_cli_writes_result_json(tmp_path, corpus, tokenizer_dir, capsys):
    from cli.train import main

    out = tmp_path / "run"
    t, m = _write(tmp_path, tiny_train_config(out, corpus, tokenizer_dir, max_tokens=4 * 32 * 2))
    assert main(["--config", str(t), "--model-config", str(m)]) == 0
    result = EngineResult.read(out)
    assert (result.outcome, result.steps, result.stopped_by) == (Outcome.succeeded, 2, "completed")
    assert Path(result.checkpoint) == out / "final" and result.attempt is None
    # again: nothing to train, reported as such (a new result replaces the old one)
    assert main(["--config", str(t), "--model-config", str(m)]) == 0
    again = EngineResult.read(out)
    assert (again.outcome, again.stopped_by, again.steps) == (Outcome.succeeded, "nothing_to_do", 2)
    assert again.message == "nothing to train: final/ is already at step 2"
    # an invalid override: reported in --out-dir, exit 2
    bad = tmp_path / "bad"
    assert (
        main(
            [
                "--config",
                str(t),
                "--model-config",
                str(m),
                "--out-dir",
                str(bad),
                "--micro-batch-size",
                "-3",
            ]
        )
        == 2
    )
    failed = EngineResult.read(bad)
    assert (failed.reason, failed.exit_code) == (FailureReason.invalid_config, 2)
    assert "micro_batch_size" in failed.message
    assert "error: invalid config" in capsys.readouterr().err


def test_classify_real_exceptions():
    with pytest.raises(MemoryError) as oom:
        bytearray(2**62)
    err = errors.classify(oom.value, "/x")
    assert (err.reason, err.exit_code, err.label) == (
        FailureReason.out_of_memory,
        1,
        "out_of_memory",
    )
    with pytest.raises(ZeroDivisionError) as bug:
        1 / 0  # noqa: B018
    err = errors.classify(bug.value, "/x")
    assert err.reason == FailureReason.crashed and str(err) == "ZeroDivisionError: division by zero"
    data = errors.DataError("x.txt: empty")
    assert errors.classify(data, "/x") is data and data.label == "invalid_data"
    stopped = errors.Interrupted("stopped by SIGTERM", signal_name="SIGTERM")
    assert (stopped.exit_code, stopped.label, stopped.reason) == (75, "interrupted", None)
    early = errors.interrupted_before_start(15, "SIGTERM")
    assert (early.exit_code, str(early)) == (143, "interrupted before training started")
