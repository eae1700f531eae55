"""The engine under faults: a full disk (a real small tmpfs; /dev/full where no mount is
allowed), damaged checkpoints, and fencing of a real training process started through
``python -m worker.entry`` with a heartbeat pipe and an owner file.

Cost: three engine subprocesses (~10-20 s each on a 2-core machine, mostly importing torch) and
a few in-process tiny runs."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml

from service import contract
from service.config.validate import validate_configs
from service.contract import EngineResult, EventKind, FailureReason, Outcome, read_events
from tests.support import REPO
from tests.support.tiny import TINY_MODEL, tiny_train_config
from worker import checkpoint as ckpt
from worker import errors, fence
from worker.launch import RankProcesses
from worker.metrics import read_metrics
from worker.train import build_model, run_training


def _validated(doc: dict):
    return validate_configs(doc, TINY_MODEL)


def _write_configs(tmp_path: Path, doc: dict) -> tuple[Path, Path]:
    t, m = tmp_path / "train.yaml", tmp_path / "model.yaml"
    t.write_text(yaml.safe_dump(doc))
    m.write_text(yaml.safe_dump(TINY_MODEL))
    return t, m


def _entry(t: Path, m: Path, log: Path, env: dict | None = None, pass_fds=()) -> subprocess.Popen:
    """``python -m worker.entry`` as the runner starts it (output to a file: no pipe to fill)."""
    with open(log, "w") as fh:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.entry",
                "--train-config",
                str(t),
                "--model-config",
                str(m),
            ],
            cwd=REPO,
            env=dict(os.environ, **(env or {})),
            pass_fds=pass_fds,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(
                f"the engine exited early with {proc.returncode}: {log.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out; output: {log.read_text()[-3000:]}")
        time.sleep(0.01)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, options: str = ""):
    """A real tmpfs of ``size`` mounted at ``path`` (``options`` appended to ``-o``, e.g.
    ``nr_inodes=3``); skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    extra = f",{options}" if options else ""
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755{extra}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("no mount command: the full-disk case needs a small tmpfs")
    if done.returncode != 0:
        pytest.skip(
            f"mounting a tmpfs is not permitted here ({done.stderr.strip() or done.returncode}); "
            "the /dev/full tests cover the classification"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder: Path) -> None:
    """Write a filler file into ``folder`` until its filesystem is full."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    assert shutil.disk_usage(folder).free == 0


# -------------------------------------------------------------------------------------------------
# a full disk
# -------------------------------------------------------------------------------------------------


def test_no_space_classification_from_real_full_device_errors(tmp_path):
    """/dev/full returns ENOSPC on every write: the plain-file error and torch.save's (through
    a file object its RuntimeError carries the OSError) classify as no_space naming the path and
    its free space; torch.save given a path name loses the errno (why checkpoints are written
    through file objects)."""
    with pytest.raises(OSError) as plain:
        with open("/dev/full", "w") as fh:
            fh.write("step,tokens\n")
            fh.flush()
    err = errors.classify(plain.value, tmp_path / "metrics.csv")
    assert (
        isinstance(err, errors.NoSpace)
        and err.reason == FailureReason.no_space
        and err.exit_code == 1
    )
    assert str(err).startswith(f"no space left on device writing {tmp_path / 'metrics.csv'} (")
    assert " free there" in str(err) and err.free_bytes == shutil.disk_usage(tmp_path).free

    with pytest.raises((OSError, RuntimeError)) as saved:
        with open("/dev/full", "wb") as fh:
            torch.save({"w": torch.zeros(50_000)}, fh)
    assert errors.classify(saved.value, tmp_path).reason == FailureReason.no_space

    with pytest.raises(RuntimeError) as by_name:
        torch.save({"w": torch.zeros(50_000)}, "/dev/full")
    assert errors.no_space_errno(by_name.value) is None
    assert errors.classify(by_name.value, tmp_path).reason == FailureReason.crashed


def test_checkpoint_on_a_full_tmpfs_is_no_space_and_leaves_no_temporary_folder(
    tmp_path, tokenizer_dir
):
    with _tmpfs(tmp_path / "disk", "512k") as disk:
        out = disk / "run"
        model = build_model(
            _validated(tiny_train_config(out, out, tokenizer_dir)).model, seq_len=32
        )
        with pytest.raises(errors.NoSpace) as caught:
            ckpt.save_checkpoint(
                out,
                "step-00000001",
                model_state=model.state_dict(),
                model_config=model.config,
                tokenizer_dir=tokenizer_dir,
                state={"optimizer": {}},
                meta={"step": 1},
            )
        message = str(caught.value)
        assert message.startswith(
            f"no space left on device writing checkpoint {out / 'step-00000001' / 'lit_model.pth'} ("
        )
        assert "KiB free there, the checkpoint needs about 1.3 MiB" in message, message
        assert errors.no_space_errno(caught.value) is not None  # the OSError is kept as the cause
        assert sorted(p.name for p in out.iterdir()) == []  # the partial temporary folder is gone


def test_metrics_on_a_full_disk_is_no_space_naming_metrics_csv(
    tmp_path, corpus, tokenizer_dir, capfd
):
    with _tmpfs(tmp_path / "disk", "64k") as disk:
        out = disk / "run"
        out.mkdir()
        _fill(disk)
        v = _validated(tiny_train_config(out, corpus, tokenizer_dir))
        with pytest.raises(errors.NoSpace) as caught:
            run_training(v.train, v.model)
        assert str(caught.value).startswith(
            f"no space left on device writing {out / 'metrics.csv'} (0 bytes free"
        )
    err = capfd.readouterr().err
    assert (
        err.count("train.log stops here") == 1 and "Logging error" not in err
    )  # one line, no tracebacks


def test_token_cache_on_a_full_disk_is_no_space_naming_the_cache(
    tmp_path, tokenizer_dir, monkeypatch
):
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("def f(x):\n    return x + 1\n" * 800)
    with _tmpfs(tmp_path / "disk", "16k") as disk:
        monkeypatch.setenv("MOEJOBS_TOKEN_CACHE", str(disk / "cache"))
        (disk / "cache").mkdir()
        _fill(disk)
        doc = tiny_train_config(tmp_path / "run", tmp_path, tokenizer_dir)
        doc["data"]["init_args"] = {
            "train_data_path": str(text),
            "val_data_path": None,
            "num_workers": 0,
        }
        v = _validated(doc)
        with pytest.raises(
            errors.NoSpace,
            match=rf"^no space left on device writing the token cache {disk / 'cache'}",
        ):
            run_training(v.train, v.model)
        assert [p.name for p in (disk / "cache").iterdir()] == []  # no partial cache file


def test_token_cache_with_no_inode_left_is_no_space_not_invalid_data(
    tmp_path, tokenizer_dir, monkeypatch
):
    """Creating the cache's temporary file fails with ENOSPC when the filesystem has no inode
    left (free blocks or not): a full disk too, not unusable data."""
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("def f(x):\n    return x + 1\n" * 50)
    with _tmpfs(tmp_path / "disk", "1m", "nr_inodes=2") as disk:  # the root and one folder
        monkeypatch.setenv("MOEJOBS_TOKEN_CACHE", str(disk / "cache"))
        (disk / "cache").mkdir()
        with pytest.raises(OSError) as full:
            (disk / "probe").touch()
        assert full.value.errno == errno.ENOSPC and shutil.disk_usage(disk).free > 0
        doc = tiny_train_config(tmp_path / "run", tmp_path, tokenizer_dir)
        doc["data"]["init_args"] = {
            "train_data_path": str(text),
            "val_data_path": None,
            "num_workers": 0,
        }
        v = _validated(doc)
        with pytest.raises(
            errors.NoSpace,
            match=rf"^no space left on device writing the token cache {disk / 'cache'}",
        ):
            run_training(v.train, v.model)


@pytest.mark.slow
def test_full_disk_inside_torch_save_ends_the_engine_as_no_space(tmp_path, corpus, tokenizer_dir):
    """The operator's case: out_dir on a small filesystem; the first checkpoint does not fit
    (torch.save fails half-way). The engine exits 1 with result.json failed/no_space naming the
    file and the free space, not crashed; the partial folder is removed."""
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        out = disk / "run"
        t, m = _write_configs(
            tmp_path, tiny_train_config(out, corpus, tokenizer_dir, save_interval=2)
        )
        log = tmp_path / "engine.log"
        proc = _entry(t, m, log)
        assert proc.wait(timeout=600) == 1, log.read_text()[-3000:]
        output = log.read_text()
        result = EngineResult.read(out)
        assert result is not None, output[-3000:]
        assert (result.outcome, result.reason, result.exit_code, result.steps) == (
            Outcome.failed,
            FailureReason.no_space,
            1,
            2,
        )
        assert result.message.startswith(
            f"no space left on device writing checkpoint {out / 'step-00000002' / 'lit_model.pth'} ("
        )
        assert "free there" in result.message and "Traceback" not in output
        assert output.strip().splitlines()[-1] == f"error: no_space: {result.message}"
        assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]
        kinds = [e.event for e in read_events(out)]
        assert EventKind.first_step in kinds and EventKind.checkpoint_written not in kinds
        assert kinds[-1] == EventKind.finished


# -------------------------------------------------------------------------------------------------
# damaged checkpoints
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def three_checkpoints(tmp_path, corpus, tokenizer_dir) -> dict:
    """4 steps with a checkpoint every 2: step-00000002, step-00000004, final (step 4)."""
    doc = tiny_train_config(
        tmp_path / "run", corpus, tokenizer_dir, max_tokens=4 * 32 * 4, save_interval=2
    )
    v = _validated(doc)
    run_training(v.train, v.model)
    return doc


def _truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)


def test_resume_auto_skips_damaged_checkpoints_with_a_warning_naming_the_file(
    three_checkpoints, caplog
):
    doc = three_checkpoints
    out = Path(doc["out_dir"])
    _truncate(out / "final" / "lit_model.pth")
    (out / "step-00000004" / "training_state.json").write_text('{"step": ')  # cut short
    doc["train"]["max_tokens"] = 4 * 32 * 6  # 6 steps now: continue
    v = _validated(doc)
    with caplog.at_level(logging.WARNING, logger="moejobs"):
        result = run_training(v.train, v.model)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"checkpoint final cannot be loaded and is skipped: {out / 'final' / 'lit_model.pth'}: "
        in w
        for w in warnings
    ), warnings
    assert any(
        f"{out / 'step-00000004' / 'training_state.json'}: unreadable" in w for w in warnings
    ), warnings
    assert result.steps == 6
    assert [int(r["step"]) for r in read_metrics(out / "metrics.csv")] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]  # from step 2
    built = [e for e in read_events(out) if e.event == EventKind.model_built][-1]
    assert built.data["resumed_from"] == str(out / "step-00000002")


def test_no_loadable_checkpoint_is_an_error_naming_the_files(three_checkpoints):
    doc = three_checkpoints
    out = Path(doc["out_dir"])
    for name in ("step-00000002", "step-00000004", "final"):
        _truncate(
            out / name / ("lit_model.pth" if name != "step-00000002" else "training_state.pt")
        )
    v = _validated(doc)
    with pytest.raises(errors.CheckpointError) as caught:
        run_training(v.train, v.model)
    message = str(caught.value)
    assert message.startswith(f"resume: no loadable checkpoint in {out}: ")
    for f in (
        out / "final" / "lit_model.pth",
        out / "step-00000004" / "lit_model.pth",
        out / "step-00000002" / "training_state.pt",
    ):
        assert str(f) in message
    assert caught.value.reason == FailureReason.invalid_data
    # an explicit resume path that does not load: named too
    doc["resume"] = str(out / "step-00000004")
    doc["out_dir"] = str(out.parent / "elsewhere")
    v = _validated(doc)
    with pytest.raises(
        errors.CheckpointError, match=rf"step-00000004 cannot be loaded: {out / 'step-00000004'}"
    ):
        run_training(v.train, v.model)


# -------------------------------------------------------------------------------------------------
# fencing of a real engine process
# -------------------------------------------------------------------------------------------------


def _beating(fd: int, stop: threading.Event) -> threading.Thread:
    def beat():
        while not stop.is_set():
            try:
                os.write(fd, b".")
            except OSError:
                return
            time.sleep(0.2)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    return thread


def _fenced_engine(
    tmp_path, corpus, tokenizer_dir, *, deadline: float, allowance: float, attempt: int = 1
):
    out = tmp_path / "run"
    doc = tiny_train_config(out, corpus, tokenizer_dir, max_tokens=4 * 32 * 2000, save_interval=1)
    t, m = _write_configs(tmp_path, doc)
    r, w = os.pipe()
    env = {
        contract.ENV_WATCHDOG_FD: str(r),
        contract.ENV_ATTEMPT: str(attempt),
        contract.ENV_TRAINER_DEADLINE: str(deadline),
        contract.ENV_CHECKPOINT_WRITE: str(allowance),
    }
    log = tmp_path / "engine.log"
    proc = _entry(t, m, log, env, pass_fds=(r,))
    os.close(r)
    return out, proc, w, log


@pytest.mark.slow
def test_an_engine_whose_worker_goes_silent_fences_itself(tmp_path, corpus, tokenizer_dir):
    deadline, allowance = 3.0, 2.0
    out, proc, w, log = _fenced_engine(
        tmp_path, corpus, tokenizer_dir, deadline=deadline, allowance=allowance
    )
    stop = threading.Event()
    try:
        _beating(w, stop)
        _wait_for(
            lambda: (out / "step-00000002").is_dir(), proc, log
        )  # training, checkpointing each step
        stop.set()  # the worker freezes: no more bytes, the pipe stays open
        silent_at = time.monotonic()
        code = proc.wait(timeout=120)
        exited_after = time.monotonic() - silent_at
    finally:
        stop.set()
        os.close(w)
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert code == 76, output[-3000:]
    # not before the deadline; within deadline + write allowance (+ the watchdog's 0.5 s poll and exit)
    assert deadline - 0.3 <= exited_after <= deadline + allowance + 1.5, exited_after
    assert "error: fenced: no heartbeat from the worker" in output
    assert not (out / contract.RESULT_FILE).exists()  # a fenced process reports nothing more
    events = read_events(out)
    fenced = [e for e in events if e.event == EventKind.fenced]
    assert len(fenced) == 1 and fenced[0].attempt == 1
    began = fenced[0].at - timedelta(seconds=fenced[0].data["waited_s"])
    written = [e for e in events if e.event == EventKind.checkpoint_written]
    assert written and all(e.attempt == 1 for e in written)
    # no checkpoint write began after the fencing began (one under way may have finished)
    for e in written:
        assert e.at - timedelta(seconds=e.data["write_s"]) <= began + timedelta(milliseconds=20), (
            e,
            began,
        )
    folders = {p.name for p in out.iterdir() if contract.checkpoint_step(p.name) is not None}
    assert folders == {
        Path(e.data["path"]).name for e in written
    }  # every folder recorded, none after
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]
    assert EventKind.finished not in {e.event for e in events}


@pytest.mark.slow
def test_an_engine_never_renames_a_checkpoint_into_a_folder_another_attempt_owns(
    tmp_path, corpus, tokenizer_dir
):
    """The owner file changes under a live engine (frozen for that instant with SIGSTOP, so the
    snapshot is exact): not one more checkpoint folder appears, the engine exits 76. (The one
    remaining race, a rename already past its owner check when the owner changes, spans
    microseconds; SIGSTOP landing inside it would fail this test, about once in 10^4 runs.)"""
    out = tmp_path / "run"
    contract.write_owner(out, 1, "this-worker")
    out_, proc, w, log = _fenced_engine(
        tmp_path, corpus, tokenizer_dir, deadline=60.0, allowance=5.0, attempt=1
    )
    stop = threading.Event()
    try:
        _beating(w, stop)  # the worker stays alive: only the owner changes
        _wait_for(lambda: (out / "step-00000002").is_dir(), proc, log)
        proc.send_signal(signal.SIGSTOP)
        before = {p.name for p in out.iterdir() if contract.is_checkpoint_name(p.name)}
        contract.write_owner(out, 2, "other-worker")
        proc.send_signal(signal.SIGCONT)
        code = proc.wait(timeout=60)
    finally:
        stop.set()
        os.close(w)
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert code == 76, output[-3000:]
    assert "error: fenced: attempt 2 on worker other-worker owns" in output
    after = {p.name for p in out.iterdir() if contract.is_checkpoint_name(p.name)}
    assert after == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]
    assert not (out / contract.RESULT_FILE).exists()
    assert contract.read_owner(out).attempt == 2


def test_save_checkpoint_refuses_the_rename_when_another_attempt_owns_the_folder(
    tmp_path, tokenizer_dir, monkeypatch
):
    """In-process, with an exit callback: the write completes in the temporary folder, the
    commit check refuses, the folder is removed and nothing appears under the final name."""
    out = tmp_path / "run"
    contract.write_owner(out, 8, "other")
    exits: list[int] = []
    monkeypatch.setattr(fence, "_current", fence.Fence(out, attempt=7, exit=exits.append))
    model = build_model(_validated(tiny_train_config(out, out, tokenizer_dir)).model, seq_len=32)
    with pytest.raises(fence.Fenced, match="attempt 8 on worker other owns"):
        ckpt.save_checkpoint(
            out,
            "step-00000003",
            model_state=model.state_dict(),
            model_config=model.config,
            tokenizer_dir=tokenizer_dir,
            state={"optimizer": {}},
            meta={"step": 3},
        )
    assert exits == [76]
    assert sorted(p.name for p in out.iterdir()) == [
        ".owner.json",
        "events.jsonl",
    ]  # the fenced event only
    # once fenced, a new write does not even start
    with pytest.raises(fence.Fenced):
        ckpt.save_checkpoint(
            out,
            "step-00000004",
            model_state=model.state_dict(),
            model_config=model.config,
            tokenizer_dir=tokenizer_dir,
            state={"optimizer": {}},
            meta={"step": 4},
        )
    assert not (out / "step-00000004").exists() and not list(out.glob(".tmp-*"))


def test_rank_processes_do_not_inherit_the_watchdog_pipe(monkeypatch):
    monkeypatch.setenv(contract.ENV_WATCHDOG_FD, "7")
    monkeypatch.setenv(contract.ENV_ATTEMPT, "3")
    env = RankProcesses.rank_env(1)
    assert contract.ENV_WATCHDOG_FD not in env
    assert env["LOCAL_RANK"] == "1" and env[contract.ENV_ATTEMPT] == "3"
