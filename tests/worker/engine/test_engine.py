"""The training engine on a tiny MoE, in-process: schedule, metrics, checkpoints, resume rules,
loss parity with stock LitGPT, pre-flight and attention mapping."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.config.plan import training_plan
from service.config.validate import validate_configs
from tests.support import REPO
from tests.support.tiny import tiny_train_config
from worker import checkpoint as ckpt
from worker.errors import PreflightError
from worker.metrics import HEADER, read_metrics
from worker.train import build_model, lm_loss, preflight, run_training


def _validated(train_doc: dict, model_doc: dict):
    return validate_configs(train_doc, model_doc)


def _run(train_doc: dict, model_doc: dict, **kwargs):
    v = _validated(train_doc, model_doc)
    return run_training(v.train, v.model, **kwargs)


def _batch(vocab: int, b: int = 2, t: int = 33, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


# ---------------------------------------------------------------------------------------------
# a short run: metrics rows, learning rates, checkpoint layout, litgpt generate
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus, tokenizer_dir):
    """6 optimizer steps (2 micro-batches each), a checkpoint every 3 steps, validation at the end."""
    out = tmp_path_factory.mktemp("finished") / "run"
    doc = tiny_train_config(out, corpus, tokenizer_dir, save_interval=3)
    doc["eval"] = {
        "interval": 0,
        "final_validation": True,
        "initial_validation": True,
        "max_iters": 2,
    }
    from tests.support.tiny import TINY_MODEL

    rows: list[dict] = []
    result = _run(doc, copy.deepcopy(TINY_MODEL), on_row=lambda row, plan: rows.append(dict(row)))
    return doc, result, rows


def test_metrics_rows_header_and_learning_rates(finished_run):
    doc, result, rows = finished_run
    out = Path(doc["out_dir"])
    lines = (out / "metrics.csv").read_text().splitlines()
    assert (
        lines[0]
        == "step,tokens,loss,learning_rate,grad_norm,tokens_per_sec,mfu,elapsed_s,val_loss,val_ppl"
    )
    table = read_metrics(out / "metrics.csv")
    assert [int(r["step"]) for r in table] == [0, 1, 2, 3, 4, 5, 6]
    # step 0: the initial validation only
    assert table[0]["loss"] == "" and float(table[0]["val_loss"]) > 0
    # tokens: 4 samples x 32 tokens per optimizer step
    assert [int(r["tokens"]) for r in table[1:]] == [128 * s for s in range(1, 7)]
    assert all(r["mfu"] == "" for r in table)  # CPU
    assert all(float(r["grad_norm"]) > 0 and math.isfinite(float(r["loss"])) for r in table[1:])
    # learning rate: warm-up 2 steps from a non-zero first step, cosine to min_lr at step 6
    v = _validated(doc, finished_run_model())
    plan = training_plan(v.train, v.model)
    lrs = [float(r["learning_rate"]) for r in table[1:]]
    assert lrs[0] == pytest.approx(3e-3 / 2, rel=1e-5)
    assert lrs[1] == pytest.approx(3e-3, rel=1e-5)
    assert lrs == pytest.approx([plan.learning_rate(s, 3e-3, 3e-4) for s in range(1, 7)], rel=1e-5)
    assert lrs[-1] == pytest.approx(3e-4, rel=1e-5)
    # monotone decay after the warm-up
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    # final validation lands on the last row; the callback got the same rows
    assert table[-1]["val_loss"] != "" and float(table[-1]["val_ppl"]) == pytest.approx(
        math.exp(float(table[-1]["val_loss"])), rel=1e-4
    )
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert result.steps == 6 and result.tokens == 768 and result.val_loss is not None


def finished_run_model() -> dict:
    from tests.support.tiny import TINY_MODEL

    return copy.deepcopy(TINY_MODEL)


def test_checkpoint_layout_is_litgpt_loadable(finished_run):
    doc, result, _ = finished_run
    out = Path(doc["out_dir"])
    assert result.checkpoint_dir == out / "final"
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "events.jsonl",
        "final",
        "metrics.csv",
        "router.csv",
        "step-00000003",
        "step-00000006",
        "train.log",
    ]
    for folder in (out / "step-00000003", out / "final"):
        files = {p.name for p in folder.iterdir()}
        assert {
            "lit_model.pth",
            "model_config.yaml",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "training_state.pt",
            "training_state.json",
        } <= files
    meta = json.loads((out / "step-00000003" / "training_state.json").read_text())
    assert meta["step"] == 3 and meta["tokens"] == 384 and meta["samples"] == 12
    assert meta["train_config"]["train"]["save_interval"] == 3
    state = ckpt.load_state(out / "final")
    assert state["optimizer"]["state"] and state["meta"]["step"] == 6

    import litgpt

    config = litgpt.Config.from_file(out / "final" / "model_config.yaml")
    model = litgpt.GPT(config)
    sd = torch.load(out / "final" / "lit_model.pth", weights_only=True)
    model.load_state_dict(sd, strict=True)  # plain LitGPT keys, no wrapper prefixes
    assert not any(k.startswith(("_orig_mod", "_forward_module", "module.")) for k in sd)


def test_events_of_a_run_in_order_with_the_plan_and_each_checkpoint(finished_run):
    """events.jsonl of an in-process run (rank 0): the stages in order, each with an aware UTC
    time; the plan in model_built; one checkpoint_written per folder, naming it. (``started``
    and ``finished`` belong to the process entry points, tested in tests/worker/engine/test_contract.py.)"""
    from service.contract import EventKind, read_events

    doc, _, _ = finished_run
    out = Path(doc["out_dir"])
    everything = read_events(out)
    # data_progress only when this run built its token cache (the cache is shared by the session)
    progress = [e for e in everything if e.event == EventKind.data_progress]
    assert not progress or progress[-1].data["done"] is True
    events = [e for e in everything if e.event != EventKind.data_progress]
    kinds = [e.event for e in events]
    assert kinds == [
        EventKind.configured,
        EventKind.data_ready,
        EventKind.model_built,
        EventKind.first_step,
        EventKind.checkpoint_written,
        EventKind.checkpoint_written,
        EventKind.checkpoint_written,
    ]
    assert all(e.at.utcoffset().total_seconds() == 0 for e in events)
    assert [e.at for e in events] == sorted(e.at for e in events)
    built = events[2].data
    assert built["plan"]["optimizer_steps"] == 6 and built["plan"]["tokens_per_step"] == 128
    assert built["parameters"] > 0 and built["resumed_from"] is None
    assert events[1].data["train_tokens"] > 0
    assert events[3].step == 1 and math.isfinite(events[3].data["loss"])
    written = [(e.step, Path(e.data["path"])) for e in events[4:]]
    assert written == [(3, out / "step-00000003"), (6, out / "step-00000006"), (6, out / "final")]
    assert {e.pid for e in events} == {os.getpid()}


@pytest.mark.slow
def test_litgpt_generate_runs_on_final_checkpoint(finished_run):
    doc, _, _ = finished_run
    final = Path(doc["out_dir"]) / "final"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "litgpt",
            "generate",
            str(final),
            "--prompt",
            "def",
            "--max_new_tokens",
            "10",
            "--precision",
            "32-true",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Time for inference" in proc.stderr + proc.stdout
    generated = [line for line in proc.stdout.splitlines() if line.startswith("def")]
    assert generated and len(generated[0]) > len("def")


# ---------------------------------------------------------------------------------------------
# resume rules
# ---------------------------------------------------------------------------------------------


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(
    finished_run, tmp_path, tiny_model
):
    """Resuming from step-3 replays steps 4-6 with the same data and learning rates: the final
    weights equal those of the run that was never interrupted."""
    doc, _, _ = finished_run
    first = Path(doc["out_dir"])
    resumed = copy.deepcopy(doc)
    resumed["out_dir"] = str(tmp_path / "resumed")
    resumed["resume"] = str(first / "step-00000003")
    result = _run(resumed, tiny_model)
    assert result.steps == 6
    table = read_metrics(tmp_path / "resumed" / "metrics.csv")
    assert [int(r["step"]) for r in table] == [4, 5, 6]
    expected = read_metrics(first / "metrics.csv")
    for got, want in zip(table, expected[4:], strict=False):
        assert float(got["learning_rate"]) == pytest.approx(float(want["learning_rate"]), rel=1e-6)
        assert float(got["loss"]) == pytest.approx(float(want["loss"]), rel=1e-5)
    a = torch.load(first / "final" / "lit_model.pth", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "final" / "lit_model.pth", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_final_at_planned_steps_means_nothing_to_do(finished_run, tiny_model):
    doc, _, _ = finished_run
    before = (Path(doc["out_dir"]) / "metrics.csv").read_text()
    result = _run(copy.deepcopy(doc), tiny_model)
    assert result.stopped_by == "nothing_to_do" and result.steps == 6
    assert (Path(doc["out_dir"]) / "metrics.csv").read_text() == before


def test_more_tokens_continue_from_final(finished_run, tmp_path, tiny_model):
    doc, _, _ = finished_run
    import shutil

    out = tmp_path / "more"
    shutil.copytree(doc["out_dir"], out)
    more = copy.deepcopy(doc)
    more["out_dir"] = str(out)
    more["train"]["max_tokens"] = 4 * 32 * 8  # 8 steps now
    result = _run(more, tiny_model)
    assert result.steps == 8 and result.stopped_by == "completed"
    table = read_metrics(out / "metrics.csv")
    steps = [int(r["step"]) for r in table]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    # extending is accepted with a warning naming the old and the new schedule
    v = _validated(more, tiny_model)
    lr7 = training_plan(v.train, v.model).learning_rate(7, 3e-3, 3e-4)
    assert float(table[7]["learning_rate"]) == pytest.approx(lr7, rel=1e-6) and lr7 > 3e-4
    log = (out / "train.log").read_text()
    assert (
        f"WARNING resume: extending the run from {out}/final (train.max_tokens 768 -> 1,024): planned optimizer "
        "steps 6 -> 8; the learning-rate schedule is recomputed for the new length: the cosine decay now "
        "reaches min_lr 0.0003 at step 8 instead of step 6; the next step (7) uses learning rate "
        f"{lr7:.4g} (the old plan: 0.0003)"
    ) in log
    assert json.loads((out / "final" / "training_state.json").read_text())["step"] == 8
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_resume_false_refuses_an_out_dir_with_checkpoints(finished_run, tiny_model):
    doc, _, _ = finished_run
    fresh = copy.deepcopy(doc)
    fresh["resume"] = False
    with pytest.raises(
        PreflightError, match=r"^resume: false but out_dir .* already holds checkpoints"
    ):
        _run(fresh, tiny_model)


def test_resume_path_must_be_a_checkpoint(train_doc, tiny_model, tmp_path):
    train_doc["resume"] = str(tmp_path)
    with pytest.raises(PreflightError, match=r"^resume: .* is not a complete checkpoint folder"):
        _run(train_doc, tiny_model)


def test_smoke_mode_writes_metrics_but_no_checkpoint(train_doc, tiny_model):
    train_doc["train"]["save_interval"] = 1
    result = _run(train_doc, tiny_model, write_checkpoints=False)
    out = Path(train_doc["out_dir"])
    assert result.checkpoint_dir is None
    assert sorted(p.name for p in out.iterdir()) == [
        "events.jsonl",
        "metrics.csv",
        "router.csv",
        "train.log",
    ]
    assert len(read_metrics(out / "metrics.csv")) == 6


def test_max_steps_and_max_time(train_doc, tiny_model):
    train_doc["train"]["max_steps"] = 2
    result = _run(copy.deepcopy(train_doc), tiny_model, write_checkpoints=False)
    assert result.steps == 2
    train_doc["train"]["max_steps"] = None
    train_doc["train"]["max_time"] = 1e-6  # reached after the first step
    train_doc["out_dir"] += "-time"
    result = _run(train_doc, tiny_model)
    assert result.steps == 1 and result.stopped_by == "max_time"
    assert (
        json.loads((Path(train_doc["out_dir"]) / "final" / "training_state.json").read_text())[
            "step"
        ]
        == 1
    )


# ---------------------------------------------------------------------------------------------
# checkpoint atomicity
# ---------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _save(
    out: Path, name: str, state: dict, tokenizer_dir: Path, tiny_model: dict, step: int = 1
) -> Path:
    v = validate_configs(tiny_train_config(out, out, tokenizer_dir), tiny_model)
    model = build_model(v.model, seq_len=32)
    return ckpt.save_checkpoint(
        out,
        name,
        model_state=model.state_dict(),
        model_config=model.config,
        tokenizer_dir=tokenizer_dir,
        state=state,
        meta={"step": step},
    )


def test_checkpoint_write_is_atomic(tmp_path, tokenizer_dir, tiny_model):
    out = tmp_path / "run"
    good = _save(out, "final", {"optimizer": {}}, tokenizer_dir, tiny_model, step=1)
    assert ckpt.read_checkpoint(good).step == 1
    # a write that fails half-way (an unpicklable training state) leaves the old folder intact
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        _save(
            out, "final", {"optimizer": {}, "bad": lambda: None}, tokenizer_dir, tiny_model, step=2
        )
    assert sorted(p.name for p in out.iterdir()) == ["final"]
    assert ckpt.read_checkpoint(out / "final").step == 1
    # replacing works and leaves nothing behind
    _save(out, "final", {"optimizer": {}}, tokenizer_dir, tiny_model, step=2)
    assert sorted(p.name for p in out.iterdir()) == ["final"]
    assert ckpt.latest_checkpoint(out).step == 2


def test_stale_temporary_folders_are_cleaned_or_restored(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = _dead_pid()
    (out / f".tmp-step-00000004-{dead}").mkdir()
    (out / f".tmp-step-00000004-{dead}" / "lit_model.pth").write_bytes(b"half")
    (out / f".old-final-{dead}").mkdir()  # died between the two renames: final/ is missing
    (out / f".old-final-{dead}" / "marker").write_text("x")
    (out / f".tmp-final-{os.getpid()}").mkdir()  # a live writer's folder is kept
    done = ckpt.clean_stale(out)
    assert len(done) == 2
    assert sorted(p.name for p in out.iterdir()) == [f".tmp-final-{os.getpid()}", "final"]
    assert (out / "final" / "marker").read_text() == "x"
    # a half-written step folder is never taken for a checkpoint
    (out / "step-00000009").mkdir()
    (out / "step-00000009" / "lit_model.pth").write_bytes(b"x")
    assert ckpt.latest_checkpoint(out) is None


# ---------------------------------------------------------------------------------------------
# model: loss parity with stock LitGPT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("moe_implementation", ["loop", "grouped"])
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_loss_equals_stock_litgpt(
    tiny_model, tmp_path, tokenizer_dir, moe_implementation, gradient_checkpointing
):
    import litgpt
    from litgpt.utils import chunked_cross_entropy

    v = validate_configs(tiny_train_config(tmp_path, tmp_path, tokenizer_dir), tiny_model)
    torch.manual_seed(0)
    ours = build_model(
        v.model,
        seq_len=32,
        moe_implementation=moe_implementation,
        gradient_checkpointing=gradient_checkpointing,
    )
    stock = litgpt.GPT(litgpt.Config(**tiny_model))
    stock.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(stock.state_dict())
    batch = _batch(1024)
    expected = chunked_cross_entropy(stock(batch[:, :-1]), batch[:, 1:])
    got = lm_loss(ours, batch)
    if moe_implementation == "loop":
        assert got.item() == expected.item()
    else:  # grouped GEMMs sum in another order
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and the gradients agree too
    got.backward()
    expected.backward()
    for (name, p), q in zip(ours.named_parameters(), stock.parameters(), strict=False):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_initialisation_is_seeded_and_scaled(tiny_model, tmp_path, tokenizer_dir):
    v = validate_configs(tiny_train_config(tmp_path, tmp_path, tokenizer_dir), tiny_model)
    torch.manual_seed(3)
    a = build_model(v.model, seq_len=32)
    torch.manual_seed(3)
    b = build_model(v.model, seq_len=32)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    d, n_layer = 64, 2
    assert a.transformer.wte.weight.std().item() == pytest.approx(math.sqrt(2 / (5 * d)), rel=0.05)
    proj = torch.cat([e.proj.weight.flatten() for e in a.transformer.h[0].mlp.experts])
    assert proj.std().item() == pytest.approx(2 / (n_layer * math.sqrt(d)), rel=0.05)


# ---------------------------------------------------------------------------------------------
# pre-flight and attention backends
# ---------------------------------------------------------------------------------------------


def test_preflight_names_the_field(train_doc, tiny_model):
    def check(overrides: dict, **machine):
        doc = copy.deepcopy(train_doc)
        for key, value in overrides.items():
            if isinstance(value, dict):
                doc.setdefault(key, {}).update(value)
            else:
                doc[key] = value
        preflight(validate_configs(doc, tiny_model).train, **machine)

    force = {"optimization": {"flash_attention_force": True}, "precision": "bf16-mixed"}
    with pytest.raises(
        PreflightError, match=r"^optimization.flash_attention_force: .*need a CUDA GPU"
    ):
        check(force, cuda_available=False)
    with pytest.raises(
        PreflightError, match=r"^optimization.flash_attention_force: .*precision is 32-true"
    ):
        check(
            {**force, "precision": "32-true"},
            cuda_available=True,
            cuda_device_count=1,
            bf16_supported=True,
        )
    with pytest.raises(PreflightError, match=r"^precision: bf16-mixed needs a GPU with bfloat16"):
        check(
            {"precision": "bf16-mixed"},
            cuda_available=True,
            cuda_device_count=1,
            bf16_supported=False,
        )
    with pytest.raises(PreflightError, match=r"^devices: 4 GPUs requested but this machine has 2"):
        check(
            {"devices": 4, "train": {"global_batch_size": 8}},
            cuda_available=True,
            cuda_device_count=2,
            bf16_supported=True,
        )
    # allowed: CPU processes beyond the core count, bf16 on a CPU, forcing flash on a bf16 GPU
    check({"devices": 4, "train": {"global_batch_size": 8}}, cuda_available=False)
    check({"precision": "bf16-mixed"}, cuda_available=False)
    check(force, cuda_available=True, cuda_device_count=1, bf16_supported=True)


def test_preflight_runs_before_anything_is_written(train_doc, tiny_model):
    train_doc["optimization"]["flash_attention_force"] = True
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(PreflightError, match="flash_attention_force"):
        _run(train_doc, tiny_model)
    assert not Path(train_doc["out_dir"]).exists()


def test_attention_backend_mapping():
    from torch.nn.attention import SDPBackend as B

    from worker.attention import choose_backends

    def names(device, **flags):
        base = {
            "flash_attention": True,
            "flash_attention_force": False,
            "disable_math_fallback": False,
        }
        return choose_backends(**{**base, **flags}, device_type=device)

    gpu = names("cuda")
    assert gpu.backends == [B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.CUDNN_ATTENTION, B.MATH]
    assert names("cuda", disable_math_fallback=True).backends == [
        B.FLASH_ATTENTION,
        B.EFFICIENT_ATTENTION,
        B.CUDNN_ATTENTION,
    ]
    assert names("cuda", flash_attention_force=True).backends == [B.FLASH_ATTENTION]
    assert names("cuda", flash_attention=False).backends == [
        B.EFFICIENT_ATTENTION,
        B.CUDNN_ATTENTION,
        B.MATH,
    ]
    cpu = names("cpu")
    assert (
        cpu.backends == [B.FLASH_ATTENTION, B.MATH]
        and "not using EFFICIENT_ATTENTION" in cpu.notes[0]
    )
    assert names("cpu", flash_attention=False, disable_math_fallback=True).backends == [B.MATH]
    # the CPU selection really runs attention forward and backward
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with cpu.context():
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    assert q.grad is not None


def test_mfu_formula():
    from worker.metrics import model_flops_utilization, peak_flops_per_device

    assert peak_flops_per_device("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989.4e12
    assert peak_flops_per_device("NVIDIA L40S", "bf16-mixed") == 362.05e12
    assert peak_flops_per_device("NVIDIA A100-SXM4-80GB", "32-true") == 156e12
    assert peak_flops_per_device("Some GPU", "bf16-mixed") is None
    assert model_flops_utilization(1e5, 1e9, 1e15, 2) == pytest.approx(0.05)
    assert model_flops_utilization(1e5, 1e9, None, 1) is None


def test_log_interval_rows_and_the_last_step(train_doc, tiny_model):
    train_doc["train"]["log_interval"] = 4  # 6 steps: rows at 4 and at the last step
    rows: list[dict] = []
    _run(train_doc, tiny_model, write_checkpoints=False, on_row=lambda row, plan: rows.append(row))
    table = read_metrics(Path(train_doc["out_dir"]) / "metrics.csv")
    assert [int(r["step"]) for r in table] == [4, 6]
    assert [r["step"] for r in rows] == [4, 6] and set(rows[0]) == set(HEADER)
    assert int(table[1]["tokens"]) == 768 and float(table[1]["tokens_per_sec"]) > 0
