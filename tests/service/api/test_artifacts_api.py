"""The API with an object store (moto's S3 server, started here): a checkpoint whose folder is
not on the API's disk downloads from the store (plain and through a signed link), and deleting
a run deletes its objects."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from service import artifacts, runs
from tests.support.client import finish_run, make_run, start_run
from tests.support.objectstore import S3Server


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def store_api(s3, monkeypatch, make_api):
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    url = f"s3://{s3.make_bucket()}/deploy"
    return make_api("sqlite", artifact_url=url, api_token="t" * 40)


def _stored_run(api, tmp_path: Path):
    """A succeeded run with checkpoint final recorded and uploaded, its folder gone from disk
    (as on an API machine that does not share RUNS_DIR)."""
    run_id = make_run(api)
    attempt = start_run(api, run_id)
    folder = tmp_path / "elsewhere" / "final"
    (folder / "sub").mkdir(parents=True)
    (folder / "lit_model.pth").write_bytes(b"w" * 70_000)
    (folder / "sub" / "state.json").write_text('{"step": 20}')
    store = artifacts.store_for(api.settings)
    assert store is not None
    store.put_folder(folder, artifacts.checkpoint_prefix(run_id, "final"))
    store.put_file(folder / "sub" / "state.json", f"runs/{run_id}/files/metrics.csv")
    (tmp_path / "train.log").write_text("line 1\nline 2\nline 3\n")
    store.put_file(tmp_path / "train.log", artifacts.run_file_key(run_id, "train.log"))
    local = api.settings.run_dir(run_id) / "out" / "final"
    with api.session() as s:
        runs.record_checkpoint(s, run_id, "final", str(local), step=20, attempt=attempt)
    finish_run(api, run_id, attempt=attempt)
    assert not local.exists()
    return run_id, store


def _members(content: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        return {
            m.name: (tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
            for m in tar.getmembers()
        }


def test_archive_and_signed_link_stream_from_the_store(store_api, tmp_path):
    api = store_api
    run_id, _store = _stored_run(api, tmp_path)
    headers = {"Authorization": "Bearer " + "t" * 40}
    answer = api.client.get(f"/runs/{run_id}/checkpoints/final/archive", headers=headers)
    assert answer.status_code == 200, answer.text
    assert int(answer.headers["content-length"]) == len(answer.content)
    root = f"{run_id}-final"
    assert _members(answer.content) == {
        root: b"",
        f"{root}/lit_model.pth": b"w" * 70_000,
        f"{root}/sub": b"",
        f"{root}/sub/state.json": b'{"step": 20}',
    }
    link = api.client.post(f"/runs/{run_id}/checkpoints/final/link", headers=headers).json()
    signed = api.client.get(link["url"])
    assert signed.status_code == 200 and signed.content == answer.content
    # weights only from the store: the loadable top-level files, no training state
    weights = api.client.get(
        f"/runs/{run_id}/checkpoints/final/archive?include=weights", headers=headers
    )
    assert weights.status_code == 200, weights.text
    assert _members(weights.content) == {root: b"", f"{root}/lit_model.pth": b"w" * 70_000}
    assert f'filename="{root}-weights.tar"' in weights.headers["content-disposition"]
    # safetensors is converted from the API's disk only: a 409 that says what to do instead
    st = api.client.get(
        f"/runs/{run_id}/checkpoints/final/archive?format=safetensors", headers=headers
    )
    assert st.status_code == 409, st.text
    assert st.json()["code"] == "not_convertible" and "include=weights" in st.json()["message"]


def test_deleting_a_run_deletes_its_objects(store_api, tmp_path):
    api = store_api
    run_id, store = _stored_run(api, tmp_path)
    assert len(store.list(artifacts.run_prefix(run_id))) == 4
    headers = {"Authorization": "Bearer " + "t" * 40}
    assert api.client.delete(f"/runs/{run_id}", headers=headers).status_code == 204
    assert store.list(artifacts.run_prefix(run_id)) == []


def test_the_log_comes_from_the_store_when_it_is_not_on_disk(store_api, tmp_path):
    api = store_api
    run_id, _store = _stored_run(api, tmp_path)
    headers = {"Authorization": "Bearer " + "t" * 40}
    answer = api.client.get(f"/runs/{run_id}/logs?tail=2", headers=headers)
    assert answer.status_code == 200 and answer.text == "line 2\nline 3\n"
    assert answer.headers["x-log-offset"] == "21"
    after = api.client.get(f"/runs/{run_id}/logs?after_byte=7", headers=headers)
    assert after.text == "line 2\nline 3\n"
    # a local log wins (the machine that trains it)
    log = api.settings.run_dir(run_id) / "train.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("local\n")
    assert api.client.get(f"/runs/{run_id}/logs", headers=headers).text == "local\n"
