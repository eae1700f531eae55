"""Router telemetry: ``out_dir/router.csv`` (long format) for both MoE implementations, with the
same routing, and the grouped-query attention the engine builds."""

from __future__ import annotations

import copy
import csv
from collections import defaultdict

import pytest
import torch

from service.config.validate import validate_configs
from tests.support.tiny import TINY_MODEL, tiny_train_config
from worker.metrics import ROUTER_HEADER
from worker.train import build_model, run_training


def _router_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames is not None
        assert tuple(reader.fieldnames) == ROUTER_HEADER
        return list(reader)


@pytest.fixture(scope="module")
def router_runs(tmp_path_factory, corpus, tokenizer_dir):
    """The same 4-step run with the grouped layer and with LitGPT's loop."""
    out = {}
    for impl in ("grouped", "loop"):
        doc = tiny_train_config(
            tmp_path_factory.mktemp(impl) / "run",
            corpus,
            tokenizer_dir,
            max_tokens=4 * 32 * 4,
            log_interval=2,
        )
        doc["optimization"]["moe_implementation"] = impl
        v = validate_configs(doc, copy.deepcopy(TINY_MODEL))
        result = run_training(v.train, v.model, write_checkpoints=False)
        out[impl] = _router_rows(result.out_dir / "router.csv")
        out[f"{impl}.log"] = (result.out_dir / "train.log").read_text()
    return out


def test_the_log_names_the_moe_expert_backend(router_runs):
    n_layer = TINY_MODEL["n_layer"]
    line = f"MoE expert backend on cpu, float32: grouped_mm ({n_layer} layer{'s' if n_layer > 1 else ''})"
    assert line in router_runs["grouped.log"]
    assert "MoE expert backend" not in router_runs["loop.log"]  # LitGPT's loop: nothing to choose
    assert "CUDA graphs off" not in router_runs["grouped.log"]


def test_router_csv_has_a_row_per_logged_step_layer_and_expert(router_runs):
    n_layer, n_expert = TINY_MODEL["n_layer"], TINY_MODEL["n_expert"]
    rows = router_runs["grouped"]
    assert len(rows) == 2 * n_layer * n_expert  # log_interval 2 over 4 steps: steps 2 and 4
    sums: dict[tuple[int, int], float] = defaultdict(float)
    for row in rows:
        fraction = float(row["fraction"])
        assert 0.0 <= fraction <= 1.0
        sums[(int(row["step"]), int(row["layer"]))] += fraction
    assert sorted(sums) == [(s, layer) for s in (2, 4) for layer in range(n_layer)]
    for total in sums.values():
        assert total == pytest.approx(1.0, abs=1e-5)
    # a real router is not perfectly uniform on real text
    assert any(abs(float(r["fraction"]) - 1 / n_expert) > 1e-3 for r in rows)


def test_loop_and_grouped_route_the_same_tokens(router_runs):
    grouped = [
        (r["step"], r["layer"], r["expert"], float(r["fraction"])) for r in router_runs["grouped"]
    ]
    loop = [(r["step"], r["layer"], r["expert"], float(r["fraction"])) for r in router_runs["loop"]]
    assert [g[:3] for g in grouped] == [lp[:3] for lp in loop]
    for g, lp in zip(grouped, loop, strict=True):
        assert g[3] == pytest.approx(lp[3], abs=1e-4)


def test_engine_model_uses_sdpa_with_enable_gqa_and_keeps_litgpt_keys():
    import litgpt

    from worker.gqa import GQASelfAttention

    v = validate_configs(
        {"tokenizer_dir": "t", "data": {"init_args": {"train_data_path": "d"}}},
        copy.deepcopy(TINY_MODEL),
    )
    torch.manual_seed(0)
    model = build_model(v.model, seq_len=32, moe_implementation="grouped")
    attention = [m for m in model.modules() if isinstance(m, litgpt.model.CausalSelfAttention)]
    assert attention and all(type(m) is GQASelfAttention for m in attention)
    stock = litgpt.GPT(model.config)
    assert set(stock.state_dict()) == set(model.state_dict())
