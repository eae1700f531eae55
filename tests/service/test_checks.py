"""service.checks: the input checks every entry point shares (the command line's dry run and
`moejobs validate`, the API's /runs/validate); tests/cli/test_cli.py compares the entry points."""

from __future__ import annotations

import pytest

from service.checks import (
    CHECKPOINT_FILES,
    LocalPaths,
    ServerPaths,
    check_run,
    input_problems,
)
from service.config.issues import ConfigError
from service.contract import FailureReason
from tests.support.api import MODEL, TRAIN


def _doc(**over) -> dict:
    doc = {
        "tokenizer_dir": None,
        "initial_checkpoint_dir": None,
        "resume": False,
        "data": {"init_args": {"train_data_path": None, "val_data_path": None}},
    }
    doc.update(over)
    return doc


def _by_field(train: dict) -> dict[str, str]:
    return {p.issue.path: p.issue.message for p in input_problems(train)}


def test_the_checkpoint_files_are_the_engines():
    from worker.checkpoint import REQUIRED

    assert CHECKPOINT_FILES == REQUIRED


def test_an_overlong_or_unreadable_path_is_a_problem_not_an_exception(tmp_path):
    long = str(tmp_path) + "/" + "a/" * 3000  # over PATH_MAX: os.stat raises ENAMETOOLONG
    problems = _by_field(_doc(tokenizer_dir=long, data={"init_args": {"train_data_path": long}}))
    shown = f"{long[:200]}... ({len(long) - 1} characters)"  # Path drops the trailing '/'
    assert problems["tokenizer_dir"] == f"{shown}: cannot be read (File name too long)"
    assert (
        problems["data.init_args.train_data_path"]
        == f"{shown}: cannot be read (File name too long)"
    )


def test_a_file_where_a_folder_belongs(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    problems = _by_field(
        _doc(
            tokenizer_dir=str(tmp_path / "f.txt"),
            data={"init_args": {"train_data_path": str(tmp_path / "f.txt")}},
        )
    )
    assert problems == {
        "tokenizer_dir": f"{tmp_path}/f.txt: is a file, not a tokenizer folder",
        "data.init_args.train_data_path": f"{tmp_path}/f.txt: expected a folder of .txt files, found a file",
    }


def test_checkpoints_resume_and_initial_weights(tmp_path):
    ckpt = tmp_path / "step-00000004"
    ckpt.mkdir()
    for name in CHECKPOINT_FILES[:-1]:
        (ckpt / name).write_bytes(b"x")
    [problem] = input_problems(_doc(resume=str(ckpt)))
    assert problem.issue.path == "resume" and problem.reason == FailureReason.invalid_config
    assert problem.exit_code == 2 and "is not a complete checkpoint folder" in problem.issue.message
    (ckpt / CHECKPOINT_FILES[-1]).write_text("{}")
    assert input_problems(_doc(resume=str(ckpt))) == []
    # initial weights without tokenizer_dir: the tokenizer comes from that folder too
    weights = tmp_path / "base"
    weights.mkdir()
    (weights / "lit_model.pth").write_bytes(b"x")
    [problem] = input_problems(_doc(initial_checkpoint_dir=str(weights)))
    assert (problem.issue.path, problem.exit_code) == ("initial_checkpoint_dir", 1)
    assert problem.issue.message == f"{weights}: holds neither tokenizer.json nor tokenizer.model"
    (weights / "lit_model.pth").unlink()
    assert _by_field(_doc(initial_checkpoint_dir=str(weights), tokenizer_dir=str(weights))) == {
        "tokenizer_dir": f"{weights}: holds neither tokenizer.json nor tokenizer.model",
        "initial_checkpoint_dir": f"{weights}: holds no lit_model.pth (the weights to start from)",
    }


def test_local_paths_resolve_from_the_working_folder_and_server_paths_under_the_data_root(tmp_path):
    train = dict(TRAIN, tokenizer_dir="./tok/../tok", resume="auto")
    local = check_run(train, MODEL, LocalPaths(tmp_path))
    assert local.train["tokenizer_dir"] == f"{tmp_path}/tok"
    assert local.train["resume"] == "auto" and local.train["out_dir"] == "out/test"
    assert [e.issue.path for e in local.errors] == [
        "tokenizer_dir",
        "data.init_args.train_data_path",
        "data.init_args.val_data_path",
    ]
    assert local.warnings == []

    server = check_run(
        train, MODEL, ServerPaths(tmp_path / "data", tmp_path / "runs", tmp_path / "runs/r")
    )
    assert server.errors == []
    assert server.train["out_dir"] == f"{tmp_path}/runs/r/out"
    assert [(w.path, w.message) for w in server.warnings] == [
        (e.issue.path, e.issue.message.replace(str(tmp_path), str(tmp_path / "data")))
        for e in local.errors
    ]


def test_schema_errors_and_escapes_are_raised(tmp_path):
    with pytest.raises(ConfigError, match="micro_batch_size"):
        check_run(dict(TRAIN, train={"micro_batch_size": 0}), MODEL, LocalPaths(tmp_path))
    with pytest.raises(ConfigError, match="climbs out of the data root"):
        check_run(
            dict(TRAIN, tokenizer_dir="../../etc"),
            MODEL,
            ServerPaths(tmp_path / "data", tmp_path / "runs", tmp_path / "runs/r"),
        )
    # on the command line any folder may be used
    assert check_run(dict(TRAIN, tokenizer_dir="../../etc"), MODEL, LocalPaths(tmp_path)).errors


def test_resume_true_needs_a_checkpoint_in_out_dir(tmp_path):
    """`resume: true` fails a run whose out_dir holds no complete checkpoint (the engine's
    pre-flight): the command line says so up front (exit 2); the API refuses it, since a new
    run's out_dir is its own empty folder."""
    train = dict(TRAIN, resume=True)
    local = check_run(train, MODEL, LocalPaths(tmp_path))
    first = local.errors[0]
    assert (first.issue.path, first.exit_code) == ("resume", 2)
    assert first.issue.message == (
        f"resume: true but out_dir {tmp_path}/out/test holds no complete checkpoint"
    )
    ckpt = tmp_path / "out/test/step-00000002"
    ckpt.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        (ckpt / name).write_bytes(b"x")
    assert "resume" not in [
        e.issue.path for e in check_run(train, MODEL, LocalPaths(tmp_path)).errors
    ]

    with pytest.raises(ConfigError) as raised:
        check_run(
            train, MODEL, ServerPaths(tmp_path / "data", tmp_path / "runs", tmp_path / "runs/r")
        )
    [issue] = raised.value.errors
    assert issue.path == "resume" and "use resume: auto" in issue.message
