"""The object-store module against a real S3 HTTP server (moto's, started here): settings,
upload and download of folders, listing, deleting a prefix, presigned URLs."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from service import artifacts
from service.artifacts import ArtifactStore, StoreError
from service.settings import Settings
from tests.support.objectstore import S3Server


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def store(s3, monkeypatch) -> ArtifactStore:
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return ArtifactStore(f"s3://{s3.make_bucket()}/team/a")


def test_parse_url():
    assert artifacts.parse_url("s3://b/p/q/") == ("b", "p/q/")
    assert artifacts.parse_url("s3://b") == ("b", "")
    with pytest.raises(ValueError):
        artifacts.parse_url("gs://b/p")


def test_settings_unset_means_no_store(tmp_path):
    settings = Settings(home=tmp_path)
    assert settings.artifact_url is None and artifacts.store_for(settings) is None
    store = artifacts.store_for(Settings(home=tmp_path, artifact_url="s3://bucket/x"))
    assert store is not None and (store.bucket, store.prefix) == ("bucket", "x/")
    with pytest.raises(ValidationError):
        Settings(home=tmp_path, artifact_url="/local/folder")


def test_folder_round_trip_list_delete(store, tmp_path):
    folder = tmp_path / "step-00000004"
    (folder / "sub").mkdir(parents=True)
    (folder / "lit_model.pth").write_bytes(b"w" * 3000)
    (folder / "sub" / "state.json").write_text('{"step": 4}')
    assert store.put_folder(folder, artifacts.checkpoint_prefix("r1", "step-00000004")) == 2
    store.put_file(folder / "sub" / "state.json", "runs/r1/files/metrics.csv")

    listed = store.list("runs/r1/")
    assert listed == [
        ("runs/r1/files/metrics.csv", 11),
        ("runs/r1/step-00000004/lit_model.pth", 3000),
        ("runs/r1/step-00000004/sub/state.json", 11),
    ]
    dest = tmp_path / "elsewhere" / "step-00000004"
    dest.parent.mkdir()
    assert store.get_folder("runs/r1/step-00000004", dest) == 2
    assert (dest / "lit_model.pth").read_bytes() == b"w" * 3000
    assert (dest / "sub" / "state.json").read_text() == '{"step": 4}'
    assert [p.name for p in dest.parent.iterdir()] == ["step-00000004"]  # no temporary left
    assert b"".join(store.iter_chunks("runs/r1/step-00000004/lit_model.pth", 1000)) == b"w" * 3000

    with pytest.raises(StoreError):
        store.get_folder("runs/r1/step-00000009", tmp_path / "none")
    assert store.delete_prefix("runs/r1/") == 3
    assert store.list("runs/r1/") == []


def test_presign_names_the_public_endpoint(s3, store, tmp_path):
    (tmp_path / "f").write_bytes(b"hello")
    store.put_file(tmp_path / "f", "runs/r2/final/f")
    url = store.presign("runs/r2/final/f", 60, filename="f.bin")
    assert url.startswith(s3.endpoint)
    answer = httpx.get(url)
    assert answer.status_code == 200 and answer.content == b"hello"
    assert 'filename="f.bin"' in answer.headers["content-disposition"]

    public = ArtifactStore(store.url, public_url="https://s3.example.org")
    bucket_path = f"https://s3.example.org/{store.bucket}/team/a/runs/r2/final/f?"
    assert public.presign("runs/r2/final/f", 60).startswith(bucket_path)  # path-style


def test_unreachable_store_is_a_store_error(s3, monkeypatch, tmp_path):
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    (tmp_path / "f").write_bytes(b"x")
    store = ArtifactStore("s3://nobucket/p")
    store._client = store._make_client(None)
    with pytest.raises(StoreError):
        store.put_file(tmp_path / "f", "k")


def test_the_bucket_is_created_once_and_start_up_may_repeat_it(s3, monkeypatch, tmp_path, capsys):
    """compose's one-shot `bucket` service (`python -m service.artifacts`) at every start."""
    import uuid

    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    url = f"s3://moejobs-{uuid.uuid4().hex[:8]}/artifacts"
    store = ArtifactStore(url)
    assert store.ensure_bucket() is True
    assert ArtifactStore(url).ensure_bucket() is False  # already there: not an error
    (tmp_path / "f").write_bytes(b"x")
    store.put_file(tmp_path / "f", "k")
    assert store.list("") == [("k", 1)]

    from service.settings import settings_for_home, use_settings

    use_settings(settings_for_home(tmp_path / "home", artifact_url=url))
    try:
        assert artifacts.main(["--wait", "0"]) == 0
        assert "already there" in capsys.readouterr().out
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing answers
        assert artifacts.main(["--wait", "0"]) == 1
    finally:
        use_settings(None)
