"""The issue-11 commands against a real server (uvicorn on a free port, SQLite): ``submit
--tag/--note``, ``runs`` (step / total, loss, tokens/s; ``--tag``, ``--name``), ``tag``,
``compare``, ``delete``, ``logs [--follow]``, and ``status --follow``'s bar (starting at the
step reached, its final label, shown in a terminal that reports zero columns)."""

from __future__ import annotations

import copy
import io
import os
import re
import threading
import time
import uuid

import pytest
import yaml

from cli import runs as client
from cli.main import main
from tests.support.client import (
    MODEL,
    TRAIN,
    finish_run,
    live_server,
    make_run,
    metric_rows,
    record_metrics,
    start_run,
    write_log,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(tmp_path_factory.mktemp("compare-cli")) as srv:
        yield srv


def _configs(folder, lr: float = 1e-3, n_expert: int = 8):
    train, model = copy.deepcopy(TRAIN), copy.deepcopy(MODEL)
    train["optimizer"]["init_args"]["lr"] = lr
    model["n_expert"] = n_expert
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.yaml").write_text(yaml.safe_dump(train))
    (folder / "model.yaml").write_text(yaml.safe_dump(model))
    return str(folder / "train.yaml"), str(folder / "model.yaml")


def _submitted_id(out: str) -> str:
    return out.split("submitted run ")[1].split()[0]


def test_tags_notes_runs_table_and_compare(server, tmp_path, capsys):
    url = ["--url", server.url]
    base = _configs(tmp_path / "a")
    assert (
        main(["submit", *base, "--name", "cli-a", "--tag", "exp1", "--tag", "lr=1e-3", *url]) == 0
    )
    a = _submitted_id(capsys.readouterr().out)
    other = _configs(tmp_path / "b", lr=3e-3, n_expert=4)
    assert (
        main(["submit", *other, "--name", "cli-b", "--tag", "exp1", "--note", "bigger lr", *url])
        == 0
    )
    b = _submitted_id(capsys.readouterr().out)
    assert main(["status", b, *url]) == 0
    shown = capsys.readouterr().out
    assert "tags     exp1\n" in shown and "note     bigger lr\n" in shown

    attempt = start_run(server, uuid.UUID(a))
    record_metrics(server, uuid.UUID(a), metric_rows(1, 30), attempt=attempt)
    assert main(["runs", "--tag", "exp1", *url]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header == ["ID", "STATUS", "CREATED", "(UTC)", "STEP", "LOSS", "TOK/S", "NAME"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {a, b}
    assert re.search(r" 30/200 +\d\.\d{4} +\d{2},\d{3}  cli-a  \[exp1, lr=1e-3\]$", rows[a])
    assert re.search(r" -/200 +- +-  cli-b  \[exp1\]$", rows[b])
    assert main(["runs", "--tag", "exp1", "--tag", "lr=1e-3", "--name", "CLI", *url]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == [a]

    # tag: add and remove on the server, note set and cleared
    assert (
        main(["tag", a, "--add", "best", "--remove", "lr=1e-3", "--note", "keep this", *url]) == 0
    )
    assert capsys.readouterr().out == f"run {a} tags: exp1, best\nnote: keep this\n"
    assert main(["tag", a, "--clear-note", *url]) == 0
    assert client.get_run(server.url, a).note is None
    assert main(["tag", a, "--add", "has space", *url]) == 2
    err = capsys.readouterr().err
    assert "  add_tags: invalid tag 'has space'" in err

    # compare: metrics per run, then exactly the two keys that differ
    assert main(["compare", a, b, *url]) == 0
    out = capsys.readouterr().out
    table = out.splitlines()
    assert table[0].split() == ["cli-a", "cli-b"]
    assert re.match(r"steps +30/200 +-/200$", table[3])
    assert re.match(r"best loss +\d\.\d+ @\d+ +-$", table[5])
    start = next(i for i, line in enumerate(table) if line.startswith("config"))
    diffs = [line.split() for line in table[start + 1 :] if line and not line.startswith("(")]
    assert diffs == [
        ["model_config.n_expert", "8", "4"],
        ["train_config.optimizer.init_args.lr", "0.001", "0.003"],
    ], out
    assert table[-1] == "(differ by construction, not shown: train_config.out_dir)"
    assert main(["compare", a, *url]) == 2
    assert "query.runs: give 2 to 20 distinct run ids" in capsys.readouterr().err


def test_delete_and_logs(server, capsys):
    url = ["--url", server.url]
    run_id = make_run(server, "logged")
    attempt = start_run(server, run_id)
    assert main(["delete", str(run_id), *url]) == 1
    assert f"`moejobs cancel {run_id}` first" in capsys.readouterr().err

    write_log(server, run_id, [f"line {i}" for i in range(1, 6)])
    assert main(["logs", str(run_id), "--tail", "2", *url]) == 0
    assert capsys.readouterr().out == "line 4\nline 5\n"

    def worker() -> None:
        log = server.settings.run_dir(run_id) / "train.log"
        for i in range(6, 10):
            time.sleep(0.15)
            with open(log, "a") as fh:
                fh.write(f"line {i}\n")
        with open(log, "a") as fh:
            fh.write("half a ")  # completed below, after the run has ended
            fh.flush()
            time.sleep(0.2)
            fh.write("line\n")
        with open(log, "a") as fh:
            fh.write("no newline at the end")
        finish_run(server, run_id, "succeeded", attempt=attempt)

    thread = threading.Thread(target=worker)
    thread.start()
    out = io.StringIO()
    try:
        final = client.logs(
            server.url, str(run_id), tail=1, follow=True, poll_seconds=0.05, out=out
        )
    finally:
        thread.join()
    assert final is not None and final.status == "succeeded"
    lines = "".join(f"line {i}\n" for i in range(5, 10)) + "half a line\n"
    assert out.getvalue() == lines + "no newline at the end\n"

    assert main(["delete", str(run_id), *url]) == 0
    assert capsys.readouterr().out == f"run {run_id} deleted\n"
    assert not server.settings.run_dir(run_id).exists()
    assert main(["delete", str(run_id), *url]) == 1
    assert "not found" in capsys.readouterr().err


def _follow_to_the_end(server, run_id, attempt, out) -> None:
    def worker() -> None:
        time.sleep(0.5)  # the command reads the run and its newest row first
        for step in range(196, 201):
            time.sleep(0.1)
            record_metrics(server, run_id, metric_rows(step, step), attempt=attempt)
        finish_run(server, run_id, "succeeded", attempt=attempt)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        client.status(server.url, str(run_id), follow=True, poll_seconds=0.05, out=out)
    finally:
        thread.join()


def test_status_follow_starts_at_the_step_reached_and_ends_with_the_status(server):
    run_id = make_run(server, "caught-up")
    attempt = start_run(server, run_id)
    record_metrics(server, run_id, metric_rows(1, 195), attempt=attempt)
    out = io.StringIO()
    _follow_to_the_end(server, run_id, attempt, out)
    text = out.getvalue()
    frames = [f for f in re.split(r"[\r\n]", text) if "step/s" in f]
    assert "195/200" in frames[0] and "?step/s" in frames[0]  # no rate before a step is made
    rates = [float(r) for r in re.findall(r"([\d.]+)step/s", text)]
    assert rates and max(rates) < 100, rates  # 5 steps in about 0.5 s, not 195 at once
    assert "caught-up [succeeded]:" in frames[-1] and "200/200" in frames[-1]
    assert text.rstrip().endswith(f"run {run_id} succeeded after 200 steps")


def test_status_follow_shows_its_bar_in_a_terminal_of_zero_columns(server):
    master, slave = os.openpty()  # a new pseudo-terminal reports 0 columns and 0 rows
    assert os.get_terminal_size(slave).columns == 0
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    run_id = make_run(server, "narrow")
    attempt = start_run(server, run_id)
    record_metrics(server, run_id, metric_rows(1, 195), attempt=attempt)
    with open(slave, "w", closefd=True) as tty:
        _follow_to_the_end(server, run_id, attempt, tty)
        tty.flush()
        time.sleep(0.2)
    os.close(master)
    reader.join(timeout=5)
    text = b"".join(chunks).decode()
    assert "narrow [succeeded]:" in text and "200/200" in text and "loss=" in text
