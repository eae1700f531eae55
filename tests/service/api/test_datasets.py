"""Datasets and tokenizers through the API: uploads of .txt files and tar archives (malicious
ones included), listing, deletion, and tokenizer requests sent to the broker's aux queue."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import pytest

from service.queue import TOKENIZER_TASK, aux_queue, tokenizer_marker_paths
from tests.support.api import TRAIN, ApiEnv, body

#: Real text: the standard library's own sources (what the engine tests use too).
STDLIB = Path(os.__file__).parent


def _texts(n: int) -> dict[str, bytes]:
    files = sorted(STDLIB.glob("*.py"))[:n]
    return {f"{p.stem}.txt": p.read_bytes() for p in files}


def _tar(
    members: Sequence[tuple[tarfile.TarInfo, bytes | None]], mode: Literal["w", "w:gz"] = "w"
) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info, None


def _special(name: str, kind: bytes, target: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def test_upload_txt_files_list_and_delete(sqlite_api: ApiEnv):
    c = sqlite_api.client
    texts = _texts(3)
    files = [("files", (name, data, "text/plain")) for name, data in texts.items()]
    files.append(("files", ("val/held-out.txt", b"held out text\n", "text/plain")))
    r = c.post("/datasets/stdlib", files=files)
    assert r.status_code == 201, r.text
    doc = r.json()
    assert doc["name"] == "stdlib" and doc["files"] == 4 and doc["folders"] == ["", "val"]
    folder = sqlite_api.data_root / "stdlib"
    assert {p.name: p.read_bytes() for p in folder.glob("*.txt")} == texts
    assert (folder / "val" / "held-out.txt").read_text() == "held out text\n"
    assert not [p for p in sqlite_api.data_root.iterdir() if p.name.startswith(".")]
    assert [d["name"] for d in c.get("/datasets").json()] == ["stdlib"]
    # exists: 409 unless overwrite
    again = c.post("/datasets/stdlib", files=files[:1])
    assert again.status_code == 409 and again.json()["code"] == "dataset_exists"
    r = c.post("/datasets/stdlib?overwrite=true", files=files[:1])
    assert r.status_code == 201 and r.json()["files"] == 1
    assert c.delete("/datasets/stdlib").status_code == 204
    assert not folder.exists() and c.get("/datasets").json() == []
    assert c.delete("/datasets/stdlib").status_code == 404


def test_upload_tar_and_tar_gz(sqlite_api: ApiEnv):
    c = sqlite_api.client
    texts = _texts(4)
    members = [_dir("train")] + [_file(f"train/{k}", v) for k, v in list(texts.items())[:3]]
    members += [_dir("val"), _file("val/" + list(texts)[3], list(texts.values())[3])]
    r = c.post(
        "/datasets/corpus", files={"archive": ("corpus.tar", _tar(members), "application/x-tar")}
    )
    assert r.status_code == 201, r.text
    assert r.json()["folders"] == ["train", "val"] and r.json()["files"] == 4
    root = sqlite_api.data_root / "corpus"
    assert (root / "train" / list(texts)[0]).read_bytes() == list(texts.values())[0]
    # raw body, gzip-compressed
    r = c.post(
        "/datasets/corpus-gz",
        content=_tar(members, "w:gz"),
        headers={"Content-Type": "application/gzip"},
    )
    assert r.status_code == 201, r.text and r.json()["files"] == 4
    # and a run can point at it
    train = {
        **TRAIN,
        "data": {
            "class_path": "TextFiles",
            "init_args": {"train_data_path": "corpus/train", "val_data_path": "corpus/val"},
        },
    }
    run = c.post("/runs", json=body(train_config=train)).json()
    assert not any(w["loc"][-1].endswith("data_path") for w in run["warnings"])
    # a dataset a queued run reads cannot be deleted or replaced
    r = c.delete("/datasets/corpus")
    assert r.status_code == 409 and r.json()["run_ids"] == [run["id"]]
    r = c.post(
        "/datasets/corpus?overwrite=true",
        files={"archive": ("c.tar", _tar(members), "application/x-tar")},
    )
    assert r.status_code == 409 and root.exists()
    c.post(f"/runs/{run['id']}/cancel")
    assert c.delete("/datasets/corpus").status_code == 204


GOOD = b"some text\n"


@pytest.mark.parametrize(
    "members, bad, reason",
    [
        ([_file("../escape.txt", GOOD)], "../escape.txt", "'..'"),
        ([_file("a/../../escape.txt", GOOD)], "a/../../escape.txt", "'..'"),
        ([_file("/etc/passwd.txt", GOOD)], "/etc/passwd.txt", "absolute"),
        (
            [_file("ok.txt", GOOD), _special("link.txt", tarfile.SYMTYPE, "/etc/passwd")],
            "link.txt",
            "symbolic link",
        ),
        (
            [_file("ok.txt", GOOD), _special("hard.txt", tarfile.LNKTYPE, "ok.txt")],
            "hard.txt",
            "hard link",
        ),
        ([_special("dev.txt", tarfile.CHRTYPE)], "dev.txt", "device"),
        ([_file("run.sh", b"#!/bin/sh\n")], "run.sh", ".txt"),
        ([_file("binary.txt", b"\xff\xfe\x00bad")], "binary.txt", "UTF-8"),
        ([_file("cut.txt", "caf\u00e9".encode()[:-1])], "cut.txt", "UTF-8"),
        ([_file("empty.txt", b"  \n")], "empty.txt", "empty"),
        ([_file(".hidden.txt", GOOD)], ".hidden.txt", "hidden"),
        ([_file("a.txt", GOOD), _file("./a.txt", GOOD)], "./a.txt", "twice"),
        ([_dir("only-a-folder")], "(upload)", "no .txt"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "symlink",
        "hardlink",
        "device",
        "not-txt",
        "not-utf8",
        "truncated-utf8",
        "empty",
        "hidden",
        "duplicate",
        "no-files",
    ],
)
def test_malicious_or_broken_tars_are_refused_whole(sqlite_api: ApiEnv, members, bad, reason):
    r = sqlite_api.client.post(
        "/datasets/evil", content=_tar(members), headers={"Content-Type": "application/x-tar"}
    )
    assert r.status_code == 422, r.text
    doc = r.json()
    assert doc["code"] == "invalid_upload" and doc["errors"][0]["loc"] == ["body", bad]
    assert reason in doc["errors"][0]["msg"]
    root = sqlite_api.data_root
    assert sorted(p.name for p in root.iterdir()) == []  # nothing left, not even staging
    assert not (root.parent / "escape.txt").exists()


def test_bad_uploads(make_api):
    env = make_api("sqlite", upload_limit_bytes=50_000)
    c = env.client
    assert c.post("/datasets/Bad_Name", files={"f": ("a.txt", GOOD)}).status_code == 422
    # the client normalises "/datasets/.." to "/", the dashboard's page: POST there is a 405
    assert c.post("/datasets/..", files={"f": ("a.txt", GOOD)}).status_code in (404, 405, 422)
    r = c.post("/datasets/tokenizers", files={"f": ("a.txt", GOOD)})
    assert r.status_code == 422 and "reserved" in r.json()["message"]
    assert c.delete("/datasets/sample").status_code == 422
    assert (
        c.post("/datasets/x", content=b"x", headers={"Content-Type": "text/plain"}).status_code
        == 415
    )
    assert c.post("/datasets/x", data={"just": "a field"}).status_code == 415  # urlencoded
    r = c.post("/datasets/x", files={"just": (None, "a field, no file")})
    assert r.status_code == 422 and "no file" in r.json()["message"]
    # over the upload limit: announced (413) or expanding from a small compressed archive (422)
    r = c.post("/datasets/big", files={"f": ("a.txt", b"a" * 60_000)})
    assert r.status_code == 413 and "MOEJOBS_UPLOAD_LIMIT_BYTES" in r.json()["message"]
    bomb = _tar([_file("a.txt", b"a" * 200_000)], "w:gz")
    assert len(bomb) < 50_000
    r = c.post("/datasets/bomb", content=bomb, headers={"Content-Type": "application/gzip"})
    assert r.status_code == 422 and "upload limit" in r.json()["message"]
    # a garbage archive
    r = c.post(
        "/datasets/junk",
        content=b"not a tar at all" * 100,
        headers={"Content-Type": "application/x-tar"},
    )
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "body"]
    assert sorted(p.name for p in env.settings.data_root.iterdir()) == []


def test_tokenizer_requests_go_to_the_aux_queue(sqlite_api: ApiEnv):
    c, settings = sqlite_api.client, sqlite_api.settings
    texts = _texts(2)
    members = [_file(f"train/{k}", v) for k, v in texts.items()]
    assert (
        c.post(
            "/datasets/corpus", content=_tar(members), headers={"Content-Type": "application/x-tar"}
        ).status_code
        == 201
    )
    r = c.post("/tokenizers/tok-a", json={"dataset": "corpus", "vocab_size": 1024})
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "pending"
    out_dir = sqlite_api.data_root / "tokenizers" / "tok-a"
    messages = sqlite_api.broker_messages(aux_queue(settings))
    assert messages == [
        {
            "task": TOKENIZER_TASK,
            "args": [],
            "kwargs": {
                "name": "tok-a",
                "dataset_dir": str(sqlite_api.data_root / "corpus" / "train"),
                "out_dir": str(out_dir),
                "vocab_size": 1024,
            },
        }
    ]
    assert sqlite_api.broker_messages() == []  # nothing on the training queue
    listed = c.get("/tokenizers").json()
    assert [(t["name"], t["status"], t["vocab_size"]) for t in listed] == [
        ("tok-a", "pending", 1024)
    ]
    assert c.post("/tokenizers/tok-a", json={"dataset": "corpus"}).status_code == 409
    # what the worker's task does when it is done (service.queue docstring)
    out_dir.mkdir(parents=True)
    (out_dir / "tokenizer.json").write_text(
        json.dumps({"model": {"vocab": {"a": 2, "b": 3}}, "added_tokens": [{"id": 0}, {"id": 1}]})
    )
    marker, error_file = tokenizer_marker_paths(settings, "tok-a")
    marker.unlink()
    listed = c.get("/tokenizers").json()
    assert [(t["name"], t["status"], t["vocab_size"]) for t in listed] == [("tok-a", "ready", 4)]
    # a failed request shows its reason and may be retried
    r = c.post("/tokenizers/tok-b", json={"dataset": "corpus/train"})
    assert r.status_code == 202
    _marker_b, error_b = tokenizer_marker_paths(settings, "tok-b")
    error_b.write_text("no .txt files\n")
    failed = {t["name"]: t for t in c.get("/tokenizers").json()}["tok-b"]
    assert failed["status"] == "failed" and failed["error"] == "no .txt files"
    assert c.post("/tokenizers/tok-b", json={"dataset": "corpus"}).status_code == 202
    assert not error_b.exists()
    # a queued run using tok-a blocks its deletion
    run = c.post("/runs", json=body(train_config={**TRAIN, "tokenizer_dir": "tokenizers/tok-a"}))
    assert run.status_code == 201
    assert c.delete("/tokenizers/tok-a").status_code == 409
    c.post(f"/runs/{run.json()['id']}/cancel")
    assert c.delete("/tokenizers/tok-a").status_code == 204 and not out_dir.exists()
    assert c.delete("/tokenizers/tok-b").status_code == 204
    assert c.delete("/tokenizers/tok-b").status_code == 404
    assert c.get("/tokenizers").json() == []


@pytest.mark.parametrize(
    "payload, loc",
    [
        ({"dataset": "../etc"}, ["body", "dataset"]),
        ({"dataset": "/etc"}, ["body", "dataset"]),
        ({"dataset": "missing"}, ["body", "dataset"]),
        ({"dataset": "corpus", "vocab_size": 10}, ["body", "vocab_size"]),
        ({"dataset": "corpus", "extra": 1}, ["body", "extra"]),
    ],
)
def test_bad_tokenizer_requests(sqlite_api: ApiEnv, payload, loc):
    r = sqlite_api.client.post("/tokenizers/t", json=payload)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == loc


def test_tokenizer_request_with_the_broker_down(make_api, tmp_path):
    env = make_api("sqlite", broker_url="redis://127.0.0.1:1/0")
    (env.settings.data_root / "d").mkdir(parents=True)
    (env.settings.data_root / "d" / "a.txt").write_text("text")
    r = env.client.post("/tokenizers/t", json={"dataset": "d"})
    assert r.status_code == 503 and r.json()["code"] == "broker_unavailable"
    assert env.client.get("/tokenizers").json() == []
