"""The client commands (cli/runs.py over cli/http.py) against the real app served by uvicorn on a free port,
over a migrated SQLite database under a temporary HOME. Runs are advanced through
``service.runs`` as a worker would."""

from __future__ import annotations

import io
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from cli import output
from cli import runs as client
from cli.http import ClientError
from cli.main import main
from service.api.models import SmokeStage, SmokeTestPublic
from service.models import RunStatus
from tests.support.client import (
    MODEL,
    TRAIN,
    finish_run,
    free_port,
    live_server,
    make_run,
    metric_rows,
    record_metrics,
    run_status,
    start_run,
    write_checkpoint,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(tmp_path_factory.mktemp("client")) as srv:
        yield srv


def run_cli(argv: list[str]) -> int:
    return main(argv)


def write_configs(
    folder: Path, train: dict | None = None, model: dict | None = None, suffix: str = ".yaml"
) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    train_path, model_path = folder / f"train{suffix}", folder / f"model{suffix}"
    train_path.write_text(yaml.safe_dump(train or TRAIN))
    model_path.write_text(yaml.safe_dump(model or MODEL))
    return train_path, model_path


# -- submit ------------------------------------------------------------------------------------


def test_submit_returns_a_queued_run(server, tmp_path, capsys):
    train, model = write_configs(tmp_path)
    run = client.submit(server.url, train, model, name="first")
    assert run.status == "queued"
    assert run.name == "first"
    assert output.steps_total(run) == 200
    assert run_status(server, run.id) == RunStatus.queued
    assert f"submitted run {run.id} (first): queued" in capsys.readouterr().out

    # The command: exit 0, the name defaults to the train file's stem.
    assert run_cli(["submit", str(train), str(model), "--url", server.url]) == 0
    out = capsys.readouterr().out
    new_id = out.split("submitted run ")[1].split()[0]
    assert client.get_run(server.url, new_id).name == "train"


def test_submit_sends_an_idempotency_key(server, tmp_path):
    train, model = write_configs(tmp_path)
    key = f"key-{uuid.uuid4()}"
    first = client.submit(
        server.url, train, model, name="once", idempotency_key=key, out=io.StringIO()
    )
    again = client.submit(
        server.url, train, model, name="once", idempotency_key=key, out=io.StringIO()
    )
    assert again.id == first.id and again.created is False


def test_submit_422_prints_every_field_path(server, tmp_path, capsys):
    bad_train = {**TRAIN, "train": {**TRAIN["train"], "micro_batch_size": 0}}
    bad_model = {**MODEL, "n_experts": 8}  # typo: the field is n_expert
    train, model = write_configs(tmp_path, bad_train, bad_model)
    code = run_cli(["submit", str(train), str(model), "--url", server.url])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: invalid request:")
    assert "  train_config.train.micro_batch_size: " in err
    assert "  model_config.n_experts: " in err
    assert "Traceback" not in err

    with pytest.raises(ClientError) as caught:
        client.submit(server.url, train, model, out=io.StringIO())
    assert caught.value.exit_code == 2 and caught.value.status_code == 422


def test_submit_unreadable_file_is_exit_2(server, tmp_path, capsys):
    train, model = write_configs(tmp_path)
    train.write_text("train: [unclosed\n")
    assert run_cli(["submit", str(train), str(model), "--url", server.url]) == 2
    err = capsys.readouterr().err
    assert "invalid YAML at line" in err and str(train) in err
    assert run_cli(["submit", str(tmp_path / "missing.yaml"), str(model), "--url", server.url]) == 2
    assert "file not found" in capsys.readouterr().err


def test_submit_accepts_json_documents(server, tmp_path):
    import json

    folder = tmp_path / "json"
    folder.mkdir()
    (folder / "t.json").write_text(json.dumps(TRAIN))
    (folder / "m.json").write_text(json.dumps(MODEL))
    run = client.submit(server.url, folder / "t.json", folder / "m.json", out=io.StringIO())
    assert run.status == "queued" and run.name == "t"


# -- runs, status, cancel ------------------------------------------------------------------------


def test_runs_lists_newest_first_with_paging(server, capsys):
    ids = [str(make_run(server, f"list-{i}")) for i in range(3)]
    page = client.list_runs(server.url, limit=2)
    assert [str(r.id) for r in page.items] == ids[::-1][:2]
    assert page.next_cursor
    nxt = client.list_runs(server.url, limit=2, cursor=page.next_cursor)
    assert str(nxt.items[0].id) == ids[0]

    assert run_cli(["runs", "--url", server.url, "--limit", "2"]) == 0
    out = capsys.readouterr().out
    header = ["ID", "STATUS", "CREATED", "(UTC)", "STEP", "LOSS", "TOK/S", "NAME"]
    assert out.splitlines()[0].split() == header
    assert ids[2] in out and "list-2" in out and "more: --cursor " in out

    assert run_cli(["runs", "--url", server.url, "--sort", "size"]) == 2
    assert "query.sort: unknown sort key" in capsys.readouterr().err


def test_status_prints_the_latest_step(server, capsys):
    run_id = make_run(server, "status-once")
    attempt = start_run(server, run_id)
    record_metrics(server, run_id, metric_rows(1, 30), attempt=attempt)
    assert run_cli(["status", str(run_id), "--url", server.url]) == 0
    out = capsys.readouterr().out
    assert "status   running" in out
    assert "steps    30/200  loss=" in out


def test_status_shows_the_tokenization_of_a_queued_run(server, capsys):
    from service.contract import EventKind, append_event

    run_id = make_run(server, "preparing")
    out_dir = server.settings.run_dir(run_id) / "out"
    assert run_cli(["status", str(run_id), "--url", server.url]) == 0
    assert "tokenizing" not in capsys.readouterr().out
    append_event(
        out_dir,
        EventKind.data_progress,
        message="1,000 tokens, 10% of 1.0 MB, 0.50M tokens/s, ETA 9 s",
        tokens=1000,
        done=False,
        stage="prepare",
    )
    assert run_cli(["status", str(run_id), "--url", server.url]) == 0
    out = capsys.readouterr().out
    assert "status   queued" in out
    assert "data     tokenizing: 1,000 tokens, 10% of 1.0 MB, 0.50M tokens/s, ETA 9 s" in out
    text = io.StringIO()

    def finish() -> None:
        time.sleep(0.3)
        with server.session() as session:
            from service import runs

            runs.request_cancel(session, run_id)

    thread = threading.Thread(target=finish)
    thread.start()
    try:
        client.status(
            server.url, str(run_id), follow=True, poll_seconds=0.1, out=text, progress=True
        )
    finally:
        thread.join()
    assert "[tokenizing: 1,000 tokens, 10% of 1.0 MB" in text.getvalue()
    append_event(
        out_dir,
        EventKind.data_progress,
        message="10,000 tokens, done in 2.0 s",
        tokens=10000,
        done=True,
        stage="prepare",
    )
    assert run_cli(["status", str(run_id), "--url", server.url]) == 0
    assert "tokenizing" not in capsys.readouterr().out


def test_status_follow_ends_when_the_run_is_terminal(server):
    run_id = make_run(server, "follow-me")
    attempt = start_run(server, run_id)

    def worker() -> None:
        # what a worker does: metric rows in batches, then the terminal state
        for first in range(1, 200, 40):
            time.sleep(0.2)
            record_metrics(server, run_id, metric_rows(first, first + 39), attempt=attempt)
        finish_run(server, run_id, "succeeded", attempt=attempt)

    thread = threading.Thread(target=worker)
    thread.start()
    out = io.StringIO()
    try:
        final = client.status(server.url, str(run_id), follow=True, poll_seconds=0.1, out=out)
    finally:
        thread.join()
    assert final.status == "succeeded"
    text = out.getvalue()
    assert "200/200" in text  # the bar reached the planned steps
    assert text.rstrip().endswith(f"run {run_id} succeeded after 200 steps")


def test_status_follow_reports_the_failure_reason(server, capsys):
    run_id = make_run(server, "doomed")
    attempt = start_run(server, run_id)
    record_metrics(server, run_id, metric_rows(1, 5), attempt=attempt)

    def fail() -> None:
        time.sleep(0.3)
        finish_run(
            server,
            run_id,
            "failed",
            attempt=attempt,
            reason="out_of_memory",
            message="CUDA out of memory",
        )

    thread = threading.Thread(target=fail)
    thread.start()
    try:
        code = run_cli(["status", str(run_id), "--follow", "--url", server.url])
    finally:
        thread.join()
    assert code == 1
    out = capsys.readouterr().out
    assert f"run {run_id} failed after 5 steps: out_of_memory: CUDA out of memory" in out


def test_cancel(server, capsys):
    run_id = make_run(server, "to-cancel")
    assert run_cli(["cancel", str(run_id), "--url", server.url]) == 0
    assert f"run {run_id} cancelled" in capsys.readouterr().out
    assert run_status(server, run_id) == RunStatus.cancelled

    running = make_run(server, "to-cancel-running")
    start_run(server, running)
    run = client.cancel(server.url, str(running), out=io.StringIO())
    assert run.status == "running" and run.cancel_requested is True

    done = make_run(server, "finished")
    finish_run(server, done, "succeeded", attempt=start_run(server, done))
    assert run_cli(["cancel", str(done), "--url", server.url]) == 1
    assert "error: conflict: " in capsys.readouterr().err


# -- download ------------------------------------------------------------------------------------


def test_download_extracts_the_checkpoint_folder(server, tmp_path, capsys):
    run_id = make_run(server, "with-checkpoints")
    attempt = start_run(server, run_id)
    step_dir = write_checkpoint(server, run_id, "step-00000050", 50)
    final_dir = write_checkpoint(server, run_id, "final", 200)
    finish_run(server, run_id, attempt=attempt)

    target = tmp_path / "model"
    assert client.download(server.url, str(run_id), out=target, stdout=io.StringIO()) == target
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in final_dir.iterdir())
    assert (target / "lit_model.pth").read_bytes() == (final_dir / "lit_model.pth").read_bytes()
    assert not list(tmp_path.glob(".model.*"))  # the staging folder is gone

    # --step N, into the default folder name, through the command
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert run_cli(["download", str(run_id), "--step", "50", "--url", server.url]) == 0
    got = tmp_path / f"{run_id}-step-00000050"
    assert (got / "model_config.yaml").read_text() == (step_dir / "model_config.yaml").read_text()

    # a .tar target keeps the archive as sent
    tar_path = tmp_path / "final.tar"
    client.download(server.url, str(run_id), out=tar_path, stdout=io.StringIO())
    with tarfile.open(tar_path) as archive:
        names = archive.getnames()
    assert f"{run_id}-final/lit_model.pth" in names

    # an existing non-empty folder is never overwritten
    assert run_cli(["download", str(run_id), "--out", str(target), "--url", server.url]) == 1
    assert "already exists" in capsys.readouterr().err


def test_download_missing_checkpoint_is_one_line(server, tmp_path, capsys):
    run_id = make_run(server, "no-checkpoints")
    code = run_cli(
        ["download", str(run_id), "--step", "7", "--out", str(tmp_path / "x"), "--url", server.url]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"error: not found: checkpoint step 7 of run {run_id}")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_download_of_a_run_without_final_lists_its_checkpoints(server, tmp_path, capsys):
    run_id = make_run(server, "cancelled-midway")
    attempt = start_run(server, run_id)
    write_checkpoint(server, run_id, "step-00000036", 36)
    write_checkpoint(server, run_id, "step-00000039", 39)
    finish_run(server, run_id, "cancelled", attempt=attempt)

    code = run_cli(["download", str(run_id), "--out", str(tmp_path / "m"), "--url", server.url])
    err = capsys.readouterr().err
    assert code == 1
    assert err == (
        f"error: not found: checkpoint final of run {run_id} (the run is cancelled); "
        f"its checkpoints: step-00000036, step-00000039; download one with --step N "
        f"(e.g. --step 39)\n"
    )
    assert not (tmp_path / "m").exists()
    # the flag it names works
    assert (
        run_cli(
            [
                "download",
                str(run_id),
                "--step",
                "39",
                "--out",
                str(tmp_path / "m"),
                "--url",
                server.url,
            ]
        )
        == 0
    )
    assert (tmp_path / "m" / "lit_model.pth").is_file()

    queued = make_run(server, "queued-no-checkpoints")
    assert (
        run_cli(["download", str(queued), "--out", str(tmp_path / "q"), "--url", server.url]) == 1
    )
    assert capsys.readouterr().err == (
        f"error: not found: checkpoint final of run {queued} "
        f"(the run is queued); it has no checkpoints yet\n"
    )


# -- errors --------------------------------------------------------------------------------------


def test_connection_refused_is_one_line(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert run_cli(["runs", "--url", url]) == 1
    err = capsys.readouterr().err
    assert (
        err == f"error: cannot connect to {url}: connection refused (is the server running? "
        "set --url or MOEJOBS_URL)\n"
    )


def test_unknown_run_and_bad_id(server, capsys):
    missing = uuid.uuid4()
    assert run_cli(["status", str(missing), "--url", server.url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: not found: run {missing}")
    assert run_cli(["status", "not-a-uuid", "--url", server.url]) == 1
    assert "'not-a-uuid' is not a run id" in capsys.readouterr().err


def test_token_required(tmp_path, capsys):
    with live_server(tmp_path, token="s3cret-token") as srv:
        assert run_cli(["runs", "--url", srv.url]) == 1
        assert capsys.readouterr().err == (
            f"error: {srv.url} needs an API token: pass --token or set MOEJOBS_API_TOKEN\n"
        )
        assert run_cli(["runs", "--url", srv.url, "--token", "wrong"]) == 1
        assert "rejected the API token" in capsys.readouterr().err
        assert run_cli(["runs", "--url", srv.url, "--token", "s3cret-token"]) == 0
        assert "no runs" in capsys.readouterr().out


# -- smoke test output ---------------------------------------------------------------------------


def test_smoke_test_lines_from_the_api_shape():
    passed = SmokeTestPublic(
        id=uuid.uuid4(),
        status="passed",
        run_status="succeeded",
        failed_stage=None,
        message=None,
        total_seconds=12.5,
        stages=[
            SmokeStage(name="queued_wait", seconds=0.4, status="ok"),
            SmokeStage(name="first_step", seconds=7.25, status="ok"),
        ],
    )
    assert output.smoke_state(passed) == "passed"
    lines = output.smoke_lines(passed)
    assert lines[0].split() == ["queued_wait", "0.4", "s", "ok"]
    assert lines[-1] == "smoke test passed"

    failed = passed.model_copy(
        update={"status": "failed", "failed_stage": "queued_wait", "message": "no live worker"}
    )
    assert (
        output.smoke_lines(failed)[-1] == "smoke test failed at stage queued_wait: no live worker"
    )
    assert output.smoke_state(passed.model_copy(update={"status": "pending"})) == "running"


def test_smoke_test_without_worker_fails_at_queued_wait(tmp_path, capsys):
    # No live worker: the server's verdict names the stage. (The shipped configs must load.)
    with live_server(tmp_path) as srv:
        code = run_cli(["smoke-test", "--url", srv.url, "--wait", "30"])
    captured = capsys.readouterr()
    assert code == 1, captured
    assert "smoke test failed at stage queued_wait" in captured.out
