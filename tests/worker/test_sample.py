"""Samples per checkpoint (worker/sample.py): greedy continuations of the sample prompts by a
real tiny MoE checkpoint, made in a low-priority process the runner starts for each checkpoint
it records, served by the API with the checkpoint list."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service import contract, runs
from service.db import Database, migrate, open_database
from service.main import create_app
from tests.support.checkpoints import train_tiny
from tests.support.db import settings_for
from worker import sample
from worker.outcome import OutcomeKind
from worker.runner import WorkerInfo, execute_attempt

PROMPTS = ["The", "def "]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, tokenizer_dir) -> Path:
    return train_tiny(tmp_path_factory.mktemp("trained") / "out", corpus, tokenizer_dir)


def test_samples_are_greedy_and_repeatable(trained: Path, tmp_path: Path):
    folder = tmp_path / "out" / "step-00000003"
    shutil.copytree(trained / "step-00000003", folder)
    doc = sample.generate_samples(folder, PROMPTS, 8)
    assert doc == {
        **sample.generate_samples(folder, PROMPTS, 8),
        "generated_at": doc["generated_at"],
    }
    assert doc["checkpoint"] == "step-00000003" and doc["step"] == 3
    assert [s["prompt"] for s in doc["samples"]] == PROMPTS
    assert all(isinstance(s["text"], str) and s["text"] for s in doc["samples"])

    # the command the runner starts writes out_dir/samples/<name>.json, not into the folder
    before = sorted(p.name for p in folder.iterdir())
    subprocess.run(sample.sample_command([folder], PROMPTS, 8), check=True, cwd=sample.REPO_ROOT)
    written = json.loads(contract.samples_path(folder).read_text())
    assert contract.samples_path(folder) == tmp_path / "out" / "samples" / "step-00000003.json"
    assert written["samples"] == doc["samples"]
    assert sorted(p.name for p in folder.iterdir()) == before

    # a folder removed before sampling (retention) is skipped quietly
    assert sample.write_samples(tmp_path / "out" / "step-00000009", PROMPTS, 8) is None


#: A stand-in engine that puts the real tiny checkpoints in place one by one, as the engine
#: does (temporary name, then rename), then reports success.
COPY_ENGINE = textwrap.dedent("""
    import os, shutil, sys, time
    from pathlib import Path
    from service.contract import EngineResult
    src, out = Path(sys.argv[1]), Path(os.environ["FAKE_OUT_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    for name in ("step-00000003", "step-00000006", "final"):
        tmp = out / f".tmp-{name}-{os.getpid()}"
        shutil.copytree(src / name, tmp)
        os.replace(tmp, out / name)
        time.sleep(0.5)
    EngineResult(outcome="succeeded", reason=None, message="copied", exit_code=0,
                 attempt=int(os.environ["MOEJOBS_ATTEMPT"])).write(out)
""")


def _claimed_run(db: Database, settings, tmp_path: Path):
    run_id = uuid.uuid4()
    train = {"out_dir": str(settings.run_dir(run_id) / "out"), "seed": 7, "resume": "auto"}
    with db.session() as session:
        runs.create_run(
            session,
            name="sampled",
            submitted_train=train,
            submitted_model={"name": "tiny"},
            resolved_train=train,
            resolved_model={"name": "tiny"},
            run_id=run_id,
        )
        run = runs.claim_run(session, run_id, "w", settings.lease_seconds)
    assert run is not None
    return run


def test_the_runner_samples_each_recorded_checkpoint_and_the_api_returns_them(
    trained: Path, tmp_path: Path
):
    settings = settings_for(
        tmp_path, sample_prompts="|".join(PROMPTS), sample_max_new_tokens=8, keep_checkpoints=0
    )
    migrate(settings)
    db = open_database(settings)
    try:
        run = _claimed_run(db, settings, tmp_path)
        out = Path(run.resolved_train["out_dir"])
        script = tmp_path / "copy_engine.py"
        script.write_text(COPY_ENGINE)
        os.environ["FAKE_OUT_DIR"] = str(out)
        try:
            outcome = execute_attempt(
                run,
                db,
                settings,
                WorkerInfo(worker_id="w"),
                poll_seconds=0.1,
                command=[sys.executable, str(script), str(trained)],
            )
        finally:
            os.environ.pop("FAKE_OUT_DIR", None)
        assert outcome.kind == OutcomeKind.succeeded, outcome
        names = ["step-00000003", "step-00000006", "final"]
        deadline = time.monotonic() + 120  # the samplers run after the attempt, at nice 19
        while not all(contract.samples_path(out / n).is_file() for n in names):
            assert time.monotonic() < deadline, (
                settings.run_dir(run.id) / "samples.log"
            ).read_text()
            time.sleep(0.2)
        docs = {n: json.loads(contract.samples_path(out / n).read_text()) for n in names}
        assert {n: d["step"] for n, d in docs.items()} == {
            "step-00000003": 3,
            "step-00000006": 6,
            "final": 6,
        }
        # the checkpoint folders themselves are unchanged (samples live beside them)
        for n in names:
            assert "samples.json" not in {p.name for p in (out / n).iterdir()}

        with TestClient(create_app(settings)) as client:
            listed = client.get(f"/runs/{run.id}/checkpoints").json()
            assert [c["name"] for c in listed] == names
            for c in listed:
                assert c["samples"] == docs[c["name"]]["samples"]
                assert [s["prompt"] for s in c["samples"]] == PROMPTS
            one = client.get(f"/runs/{run.id}/checkpoints/final").json()
            assert one["name"] == "final" and one["samples"] == docs["final"]["samples"]
            # the step-6 and final weights are the same: so are their greedy samples
            assert docs["final"]["samples"] == docs["step-00000006"]["samples"]
    finally:
        db.dispose()


def test_none_turns_samples_off_also_in_a_child_process(monkeypatch):
    """An empty variable is ignored (the default prompts would come back in a worker started
    with the parent's settings); ``none`` reaches the child and means no prompts."""
    from service.settings import Settings

    parent = Settings(sample_prompts="none")
    assert parent.sample_prompt_list == []
    for name, value in parent.to_env().items():
        monkeypatch.setenv(name, value)
    assert Settings().sample_prompt_list == []
    monkeypatch.setenv("MOEJOBS_SAMPLE_PROMPTS", "")
    assert Settings().sample_prompt_list == ["The", "In the", "Once upon a time"]
