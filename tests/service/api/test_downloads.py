"""Checkpoint downloads without the training state (``?include=weights``) and as safetensors
(``?format=safetensors``) of a real tiny MoE checkpoint, served by uvicorn: both load into
stock ``litgpt.GPT`` with ``strict=True``; bad query values are 422s naming the parameter."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx
import pytest
import torch

from service import contract
from tests.support.checkpoints import install, train_tiny
from tests.support.client import LiveServer, live_server, make_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, tokenizer_dir) -> Path:
    return train_tiny(tmp_path_factory.mktemp("trained") / "out", corpus, tokenizer_dir)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("downloads")) as srv:
        yield srv


def _get(server: LiveServer, path: str, **params: str) -> httpx.Response:
    return httpx.get(server.url + path, params=params, timeout=60)


def _files(data: bytes, root: str) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                handle = tar.extractfile(member)
                assert handle is not None and member.name.startswith(root + "/")
                out[member.name[len(root) + 1 :]] = handle.read()
    return out


def _load_strict(folder_files: dict[str, bytes], state: dict, tmp_path: Path):
    import litgpt

    (tmp_path / "model_config.yaml").write_bytes(folder_files["model_config.yaml"])
    model = litgpt.GPT(litgpt.Config.from_file(tmp_path / "model_config.yaml"))
    model.load_state_dict(state, strict=True)
    return model


def test_weights_only_and_safetensors_archives_load_into_stock_litgpt(
    server: LiveServer, trained: Path, tmp_path: Path
):
    from safetensors.torch import load as load_safetensors

    run_id = make_run(server, "downloads")
    folders = install(server.settings, server.db, run_id, trained)
    base = f"/runs/{run_id}/checkpoints/final/archive"
    root = f"{run_id}-final"
    on_disk = {p.name: p.read_bytes() for p in folders["final"].iterdir()}
    expected_sd = torch.load(folders["final"] / "lit_model.pth", weights_only=True)

    full = _get(server, base)
    weights = _get(server, base, include="weights")
    st = _get(server, base, format="safetensors")
    for r in (full, weights, st):
        assert r.status_code == 200, r.text
        assert int(r.headers["content-length"]) == len(r.content) and len(r.content) % 10240 == 0
    assert f'filename="{root}-weights.tar"' in weights.headers["content-disposition"]
    assert f'filename="{root}-safetensors.tar"' in st.headers["content-disposition"]

    # the whole folder: training state included
    assert _files(full.content, root) == on_disk
    assert {"training_state.pt", "training_state.json"} <= set(on_disk)

    # weights only: the loadable files, byte for byte, and nothing else; smaller
    got = _files(weights.content, root)
    assert got == {k: v for k, v in on_disk.items() if k in contract.CHECKPOINT_LOADABLE}
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.json"} <= set(got)
    assert not any(name.startswith("training_state") for name in got)
    assert len(weights.content) < len(full.content)
    sd = torch.load(io.BytesIO(got["lit_model.pth"]), weights_only=True)
    _load_strict(got, sd, tmp_path)

    # safetensors: model.safetensors with LitGPT's key names instead of lit_model.pth
    got_st = _files(st.content, root)
    assert set(got_st) == (set(got) - {"lit_model.pth"}) | {"model.safetensors"}
    assert all(got_st[k] == got[k] for k in got_st if k != "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(got_st["model.safetensors"])
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    assert list(tensors) == list(expected_sd)
    assert all(torch.equal(tensors[k], v) for k, v in expected_sd.items())
    assert load_safetensors(got_st["model.safetensors"]).keys() == expected_sd.keys()
    _load_strict(got_st, tensors, tmp_path)

    # a step checkpoint, by number
    r = _get(server, f"/runs/{run_id}/checkpoints/3/archive", format="safetensors")
    assert r.status_code == 200 and "model.safetensors" in _files(
        r.content, f"{run_id}-step-00000003"
    )


def test_bad_download_variants_are_422s_naming_the_parameter(server: LiveServer, trained: Path):
    run_id = make_run(server, "bad-variants")
    install(server.settings, server.db, run_id, trained)
    base = f"/runs/{run_id}/checkpoints/final"
    for params, loc, words in (
        ({"include": "optimizer"}, ["query", "include"], ("'all'", "'weights'")),
        ({"format": "gguf"}, ["query", "format"], ("'pth'", "'safetensors'")),
        ({"include": "all", "format": "safetensors"}, ["query", "include"], ("include=weights",)),
    ):
        for method, path in (("GET", f"{base}/archive"), ("POST", f"{base}/link")):
            r = httpx.request(method, server.url + path, params=params, timeout=30)
            assert r.status_code == 422, (params, r.text)
            (error,) = r.json()["errors"]
            assert error["loc"] == loc and all(w in error["msg"] for w in words), error


def test_download_link_keeps_the_variant(server: LiveServer, trained: Path):
    run_id = make_run(server, "link-variant")
    install(server.settings, server.db, run_id, trained)
    path = f"/runs/{run_id}/checkpoints/final/link"
    r = httpx.post(server.url + path, params={"include": "weights"}, timeout=30)
    assert r.json()["url"] == f"/runs/{run_id}/checkpoints/final/archive?include=weights"
    r = httpx.post(server.url + path, params={"format": "safetensors"}, timeout=30)
    url = r.json()["url"]
    assert url.endswith("?format=safetensors")
    assert "model.safetensors" in _files(httpx.get(server.url + url).content, f"{run_id}-final")


def test_a_weights_file_that_is_not_a_plain_state_dict_is_a_409(server: LiveServer, trained: Path):
    run_id = make_run(server, "odd-weights")
    folders = install(server.settings, server.db, run_id, trained)
    torch.save({"w": torch.zeros(4, 4).t()}, folders["final"] / "lit_model.pth")  # a strided view
    r = _get(server, f"/runs/{run_id}/checkpoints/final/archive", format="safetensors")
    assert r.status_code == 409 and r.json()["code"] == "not_convertible", r.text
    assert "strided" in r.json()["message"]
    r = _get(server, f"/runs/{run_id}/checkpoints/final/archive", include="weights")
    assert r.status_code == 200
