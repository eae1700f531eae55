"""``moejobs download --weights-only`` and ``--format safetensors`` against the real app served
by uvicorn, on a real tiny MoE checkpoint: the extracted folders load into stock LitGPT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli.main import main
from tests.support.checkpoints import install, train_tiny
from tests.support.client import live_server, make_run


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("client-downloads")) as srv:
        yield srv


def _strict(folder: Path, state: dict) -> None:
    import litgpt

    model = litgpt.GPT(litgpt.Config.from_file(folder / "model_config.yaml"))
    model.load_state_dict(state, strict=True)


def test_weights_only_and_safetensors_downloads(server, tmp_path, corpus, tokenizer_dir, capsys):
    from safetensors.torch import load_file

    trained = train_tiny(tmp_path / "trained", corpus, tokenizer_dir)
    run_id = make_run(server, "cli-variants")
    install(server.settings, server.db, run_id, trained)
    url = ["--url", server.url]

    light = tmp_path / "light"
    assert main(["download", str(run_id), "--weights-only", "--out", str(light), *url]) == 0
    names = {p.name for p in light.iterdir()}
    assert {"lit_model.pth", "model_config.yaml", "tokenizer.json"} <= names
    assert not any(n.startswith("training_state") for n in names)
    _strict(light, torch.load(light / "lit_model.pth", weights_only=True))

    st = tmp_path / "st"
    assert main(["download", str(run_id), "--format", "safetensors", "--out", str(st), *url]) == 0
    assert "model.safetensors" in {p.name for p in st.iterdir()}
    assert not (st / "lit_model.pth").exists() and not (st / "training_state.pt").exists()
    _strict(st, load_file(st / "model.safetensors"))

    assert (
        main(
            [
                "download",
                str(run_id),
                "--step",
                "3",
                "--weights-only",
                "--out",
                str(tmp_path / "s3.tar"),
                *url,
            ]
        )
        == 0
    )
    assert (tmp_path / "s3.tar").stat().st_size < sum(
        p.stat().st_size for p in (trained / "step-00000003").iterdir()
    )
    capsys.readouterr()
