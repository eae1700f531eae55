"""Resume checks on tiny real MoE runs: a checkpoint records its data, tokenizer and plan, and a
resume of a different run is refused (naming each difference) unless resume_allow_changes accepts
it; a checkpoint from before the checks resumes with a warning; fine-tune runs
(initial_checkpoint_dir + resume auto) continue their own checkpoint.

Cost: one 6-step base run shared by the module; the refusals stop before the token cache and the
model are built; three short training runs (2-3 steps) and one fine-tune of 2 + 1 steps."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from service.config.validate import validate_configs
from tests.support.tiny import TINY_MODEL, tiny_train_config
from worker import checkpoint as ckpt
from worker.errors import PreflightError
from worker.metrics import read_metrics
from worker.train import run_training

STEP3 = "step-00000003"


def _run(train_doc: dict, **kwargs):
    v = validate_configs(train_doc, copy.deepcopy(TINY_MODEL))
    return run_training(v.train, v.model, **kwargs)


def _refusal(train_doc: dict) -> str:
    with pytest.raises(PreflightError) as info:
        _run(train_doc)
    assert info.value.exit_code == 2 and info.value.reason == "invalid_config"
    return str(info.value)


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus, tokenizer_dir):
    """6 optimizer steps of 4 x 32 tokens, checkpoints at step 3 and final/ (step 6)."""
    out = tmp_path_factory.mktemp("base") / "run"
    doc = tiny_train_config(out, corpus, tokenizer_dir, save_interval=3)
    _run(doc)
    return doc


def _from_step3(base: dict, out: Path, **train) -> dict:
    """The base config resuming from its step-3 checkpoint into ``out``, ``train`` overrides merged."""
    doc = copy.deepcopy(base)
    doc["out_dir"] = str(out)
    doc["resume"] = str(Path(base["out_dir"]) / STEP3)
    doc["train"].update(train)
    return doc


def _cache_files() -> set[str]:
    import os

    root = Path(os.environ["MOEJOBS_TOKEN_CACHE"])
    return {p.name for p in root.glob("*.npy")} if root.is_dir() else set()


def test_checkpoint_records_data_tokenizer_and_plan(base, corpus, tokenizer_dir):
    from worker.data import files_sha256
    from worker.tokenizer import tokenizer_hash

    meta = json.loads((Path(base["out_dir"]) / STEP3 / "training_state.json").read_text())
    train_files = sorted((corpus / "train").glob("*.txt"))
    assert meta["train_data"] == {
        "sha256": files_sha256(train_files),
        "files": len(train_files),
        "bytes": sum(f.stat().st_size for f in train_files),
    }
    assert meta["val_data"]["sha256"] == files_sha256(sorted((corpus / "val").glob("*.txt")))
    assert meta["tokenizer_sha256"] == tokenizer_hash(tokenizer_dir)
    assert meta["plan"] == {
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "seq_len": 32,
        "max_tokens": 768,
        "max_steps": None,
        "optimizer_steps": 6,
    }
    assert ckpt.load_state(Path(base["out_dir"]) / STEP3)["meta"]["plan"] == meta["plan"]


def test_changed_text_is_refused_naming_the_data(base, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(base["data"]["init_args"]["train_data_path"], train)
    with open(train / "csv.txt", "a", encoding="utf-8") as fh:
        fh.write("# one more line\n")
    doc = _from_step3(base, tmp_path / "run")
    doc["data"]["init_args"]["train_data_path"] = str(train)
    before = _cache_files()
    message = _refusal(doc)
    old = json.loads((Path(base["out_dir"]) / STEP3 / "training_state.json").read_text())[
        "train_data"
    ]
    assert message.startswith(
        f"resume: {base['out_dir']}/{STEP3} was written by a run that differs from this one: "
        f"training data ({train}): 14 files, {old['bytes']:,} bytes, sha256 {old['sha256'][:12]} "
        f"-> 14 files, {old['bytes'] + 16:,} bytes, sha256 "
    ), message
    assert message.endswith(
        ". To continue it anyway, add resume_allow_changes: [data] to the train config "
        "(run_train.py: --resume-allow-changes data); to train from scratch instead, use "
        "another out_dir"
    )
    assert "tokenizer" not in message and "lr" not in message
    assert _cache_files() == before  # refused before the changed text was tokenized
    assert not ckpt.list_checkpoints(tmp_path / "run")


def test_another_tokenizer_is_refused_naming_the_tokenizer(base, tmp_path, tokenizer_dir):
    other = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["model_max_length"] = 4096
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    doc = _from_step3(base, tmp_path / "run")
    doc["tokenizer_dir"] = str(other)
    message = _refusal(doc)
    assert (
        f": tokenizer ({other}): sha256 " in message
        and "resume_allow_changes: [tokenizer]" in message
    )
    assert "training data" not in message


#: each plan change, the text naming it, and the resume_allow_changes entry that accepts it
PLAN_CHANGES: dict[str, tuple[dict[str, Any], str, str]] = {
    "lr": ({"optimizer": {"init_args": {"lr": 1e-3}}}, "optimizer lr: 0.003 -> 0.001", "schedule"),
    "min_lr": ({"train": {"min_lr": 1e-4}}, "train.min_lr: 0.0003 -> 0.0001", "schedule"),
    "warm-up": ({"train": {"lr_warmup_steps": 3}}, "warm-up: 2 -> 3 optimizer steps", "schedule"),
    "global batch": (
        {"train": {"global_batch_size": 8}},
        "train.global_batch_size: 4 -> 8",
        "batch",
    ),
    "seq len": (
        {"train": {"max_seq_length": 64}},
        "sequence length (train.max_seq_length): 32 -> 64",
        "seq_len",
    ),
}


def _changed(base: dict, out: Path, *names: str) -> dict:
    from service.config.merge import deep_merge

    doc = _from_step3(base, out)
    for name in names:
        doc = deep_merge(doc, PLAN_CHANGES[name][0])
    return doc


@pytest.mark.parametrize("name", list(PLAN_CHANGES))
def test_each_plan_change_is_refused_naming_it(base, tmp_path, name):
    _, text, kind = PLAN_CHANGES[name]
    message = _refusal(_changed(base, tmp_path / "run", name))
    assert (
        f"differs from this one: {text}. To continue it anyway, add resume_allow_changes: [{kind}] "
        in message
    )


def test_all_changes_in_one_message_and_the_allow_key_accepts_each(
    base, tmp_path, tokenizer_dir, caplog
):
    """Every difference in one message; leaving out any one entry of resume_allow_changes refuses
    just that one; with all of them the run continues (and says what it accepted)."""
    train = tmp_path / "train"
    shutil.copytree(base["data"]["init_args"]["train_data_path"], train)
    (train / "zz_extra.txt").write_text("def extra():\n    return 1\n" * 40, encoding="utf-8")
    doc = _changed(base, tmp_path / "run", *PLAN_CHANGES)
    doc["data"]["init_args"]["train_data_path"] = str(train)
    # 8 x 64 tokens per step: 5 steps, so 2 more after step 3
    doc["train"]["max_tokens"] = 8 * 64 * 5
    message = _refusal(doc)
    texts = [text for _, text, _ in PLAN_CHANGES.values()]
    body = message.split(" differs from this one: ", 1)[1].split(". To continue it anyway", 1)[0]
    parts = body.split("; ")
    assert parts[0].startswith(f"training data ({train}): 14 files") and "-> 15 files" in parts[0]
    assert parts[1:] == texts
    assert "add resume_allow_changes: [data, schedule, batch, seq_len] " in message
    assert "--resume-allow-changes data,schedule,batch,seq_len)" in message

    every = ["data", "schedule", "batch", "seq_len"]
    for left_out in every:
        doc["resume_allow_changes"] = [k for k in every if k != left_out]
        again = _refusal(doc)
        refused = (
            again.split(" differs from this one: ", 1)[1].split(". To continue", 1)[0].split("; ")
        )
        assert refused == (
            [parts[0]]
            if left_out == "data"
            else [t for _, t, kind in PLAN_CHANGES.values() if kind == left_out]
        ), left_out
        assert f"resume_allow_changes: [{left_out}] " in again

    doc["resume_allow_changes"] = every
    caplog.set_level("WARNING", logger="moejobs")
    result = _run(doc)
    assert result.steps == 5 and result.stopped_by == "completed"
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [4, 5]
    assert int(rows[-1]["tokens"]) == 3 * 128 + 2 * 8 * 64
    warned = [r.getMessage() for r in caplog.records]
    for text in texts:
        kind = next(k for _, t, k in PLAN_CHANGES.values() if t == text)
        assert f"resume: accepted by resume_allow_changes ({kind}): {text}" in warned
    # the new checkpoint records the new run: resuming it again needs nothing allowed
    meta = json.loads((tmp_path / "run" / "final" / "training_state.json").read_text())
    assert meta["plan"]["seq_len"] == 64 and meta["train_data"]["files"] == 15


def test_shorter_run_says_nothing_more_is_trained(base, tmp_path, caplog):
    caplog.set_level("WARNING", logger="moejobs")
    doc = _from_step3(base, tmp_path / "run", max_tokens=4 * 32 * 2)
    result = _run(doc)
    assert result.steps == 3 and result.checkpoint_dir == tmp_path / "run" / "final"
    assert (
        not (tmp_path / "run" / "metrics.csv").exists()
        or read_metrics(tmp_path / "run" / "metrics.csv") == []
    )
    assert [r.getMessage() for r in caplog.records if "shortening" in r.getMessage()] == [
        f"resume: shortening the run from {base['out_dir']}/{STEP3} (train.max_tokens 768 -> 256): planned "
        "optimizer steps 6 -> 2; the learning-rate schedule is recomputed for the new length: the cosine decay "
        "now reaches min_lr 0.0003 at step 2 instead of step 6; the checkpoint is already at step 3, not before "
        "the new end: nothing more is trained and final/ is written from it"
    ]


def _strip_record(folder: Path) -> None:
    """Make ``folder`` look like a checkpoint written before the resume checks."""
    meta = json.loads((folder / "training_state.json").read_text())
    for key in (*ckpt.RESUME_RECORD_KEYS, "val_data"):
        meta.pop(key)
    (folder / "training_state.json").write_text(json.dumps(meta))
    state = ckpt.load_state(folder)
    state["meta"] = meta
    torch.save(state, folder / "training_state.pt")


def test_checkpoint_from_before_the_checks_resumes_with_a_warning(base, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(Path(base["out_dir"]) / STEP3, out / STEP3)
    _strip_record(out / STEP3)
    doc = copy.deepcopy(base)
    doc["out_dir"] = str(out)
    doc["optimizer"]["init_args"]["lr"] = 1e-3  # would be refused if it could be checked
    caplog.set_level("WARNING", logger="moejobs")
    result = _run(doc)
    assert result.steps == 6
    assert [int(r["step"]) for r in read_metrics(out / "metrics.csv")] == [4, 5, 6]
    assert (
        f"resume: {out}/{STEP3} was written before moejobs recorded the data and tokenizer hashes and the "
        "plan in training_state.json: resuming without checking that the data, the tokenizer, the "
        "learning-rate schedule, the batch size and the sequence length are the same as then"
    ) in [r.getMessage() for r in caplog.records]
    assert json.loads((out / "final" / "training_state.json").read_text())["plan"]["lr"] == 1e-3


def test_checkpoint_of_the_old_token_format_resumes_with_a_warning(base, tmp_path, caplog):
    """A run in flight when moejobs began tokenizing like LitGPT (token format 1 -> 2): its
    checkpoint records the same raw text, so the data check passes; the token change is a
    warning in the log and the data_ready event, and the new checkpoints record format 2."""
    from service.contract import read_events
    from worker.data import CACHE_FORMAT

    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(Path(base["out_dir"]) / STEP3, out / STEP3)
    meta = json.loads((out / STEP3 / "training_state.json").read_text())
    assert meta["token_format"] == CACHE_FORMAT == 2
    del meta["token_format"]  # written before the field: format 1
    (out / STEP3 / "training_state.json").write_text(json.dumps(meta))
    doc = copy.deepcopy(base)
    doc["out_dir"] = str(out)
    caplog.set_level("WARNING", logger="moejobs")
    result = _run(doc)
    assert result.steps == 6
    assert [int(r["step"]) for r in read_metrics(out / "metrics.csv")] == [4, 5, 6]
    warning = (
        f"resume: {out}/{STEP3} was trained on tokens of format 1 and this run tokenizes the same text "
        "with format 2 (each file is now read as LitGPT's tokenize() reads it: CRLF line ends become LF "
        "and the text is stripped of leading and trailing whitespace): the steps from here on see "
        "slightly different token ids than the steps before"
    )
    assert warning in [r.getMessage() for r in caplog.records]
    assert [e.message for e in read_events(out) if e.event == "data_ready"] == [warning]
    assert json.loads((out / "final" / "training_state.json").read_text())["token_format"] == 2


def test_fine_tune_with_resume_auto_starts_from_initial_weights_then_from_its_own_checkpoint(
    base, tmp_path, corpus, tokenizer_dir
):
    """initial_checkpoint_dir + resume: auto validates; an empty out_dir starts from the initial
    weights (the first step's loss is that of the initial model on the first batches); once the
    run has a checkpoint, a re-queued attempt continues it (same final weights as one attempt)."""
    from worker.data import WindowSampler, prepare_data
    from worker.tokenizer import load_tokenizer
    from worker.train import build_model, lm_loss

    initial = Path(base["out_dir"]) / "final"
    out = tmp_path / "finetune"
    doc = tiny_train_config(
        out, corpus, tokenizer_dir, max_tokens=4 * 32 * 2, save_interval=1, lr_warmup_steps=1
    )
    doc.update(initial_checkpoint_dir=str(initial), resume="auto", seed=99)
    v = validate_configs(doc, copy.deepcopy(TINY_MODEL))
    assert v.train.resume == "auto" and v.train.initial_checkpoint_dir == str(initial)

    result = run_training(v.train, v.model)
    assert result.steps == 2
    log = (out / "train.log").read_text()
    assert f"weights initialised from {initial}" in log
    # the first step's loss: the initial model on the run's first two micro-batches
    model = build_model(v.model, seq_len=32)
    model.load_state_dict(ckpt.load_weights(initial))
    tok = load_tokenizer(tokenizer_dir, 1024)
    data = prepare_data(corpus / "train", corpus / "val", tok, tokenizer_dir, 1024, 32, 2, False)
    sampler = WindowSampler(data.train, 32, 2, v.train.data.init_args.seed)
    with torch.no_grad():
        want = (lm_loss(model, sampler.batch(0)) + lm_loss(model, sampler.batch(1))) / 2
    first = read_metrics(out / "metrics.csv")[0]
    assert int(first["step"]) == 1 and float(first["loss"]) == pytest.approx(float(want), rel=1e-5)

    # a re-queued attempt: the run's own step-1 is what is left; it continues from there
    weights = torch.load(out / "final" / "lit_model.pth", weights_only=True)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "step-00000002")
    result = run_training(v.train, v.model)
    assert result.steps == 2
    assert [int(r["step"]) for r in read_metrics(out / "metrics.csv")] == [1, 2]
    log = (out / "train.log").read_text()
    assert (
        f"resuming from {out}/step-00000001 (step 1); initial_checkpoint_dir {initial} is not used: the run "
        "has its own checkpoint"
    ) in log
    again = torch.load(out / "final" / "lit_model.pth", weights_only=True)
    for key in weights:
        torch.testing.assert_close(again[key], weights[key], rtol=1e-5, atol=1e-6)


def test_run_train_refuses_with_exit_2_and_the_flag_accepts(base, tmp_path, capsys):
    """run_train.py: the refusal is one line `error: invalid_config: resume: ...`, exit 2;
    --resume-allow-changes sets the key."""
    from cli.train import build_parser, main, train_overrides

    args = build_parser().parse_args(["--resume-allow-changes", "schedule, batch"])
    assert train_overrides(args) == {"resume_allow_changes": ["schedule", "batch"]}

    train_yaml, model_yaml = tmp_path / "train.yaml", tmp_path / "model.yaml"
    train_yaml.write_text(yaml.safe_dump(_changed(base, tmp_path / "run", "lr")))
    model_yaml.write_text(yaml.safe_dump(TINY_MODEL))
    code = main(["--config", str(train_yaml), "--model-config", str(model_yaml)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert (
        err[-1].startswith("error: invalid_config: resume: ")
        and "optimizer lr: 0.003 -> 0.001" in err[-1]
    )
    # accepted with the flag: the 3 remaining steps train
    code = main(
        [
            "--config",
            str(train_yaml),
            "--model-config",
            str(model_yaml),
            "--resume-allow-changes",
            "schedule",
        ]
    )
    assert code == 0, capsys.readouterr().err[-2000:]
    assert json.loads((tmp_path / "run" / "final" / "training_state.json").read_text())["step"] == 6


def test_warm_up_fraction_is_compared_at_the_old_length(tmp_path, corpus, tokenizer_dir):
    """lr_warmup_fraction: extending the run lengthens the warm-up (said in the warning, accepted);
    another fraction is a schedule change (refused). Pure comparison, no training."""
    from service.config.plan import training_plan

    def record(doc):
        v = validate_configs(doc, copy.deepcopy(TINY_MODEL))
        plan = training_plan(v.train, v.model)
        rec = ckpt.resume_record(v.train, plan, None, "tok")
        rec["train_data"] = {"sha256": "x", "files": 1, "bytes": 1}
        return v.train, plan, rec

    old_doc = tiny_train_config(
        tmp_path / "run", corpus, tokenizer_dir, lr_warmup_steps=None, lr_warmup_fraction=0.5
    )
    _, old_plan, old_rec = record(old_doc)
    assert old_plan.warmup_steps == 3 and old_plan.optimizer_steps == 6
    info = ckpt.CheckpointInfo(path=tmp_path / "run" / STEP3, step=3, meta={"step": 3, **old_rec})

    longer = copy.deepcopy(old_doc)
    longer["train"]["max_tokens"] = 4 * 32 * 8
    train, plan, rec = record(longer)
    check = ckpt.check_resume(info, rec, train=train, plan=plan)
    assert check.refused == [] and check.warnings == [
        f"resume: extending the run from {info.path} (train.max_tokens 768 -> 1,024): planned optimizer steps 6 -> 8; "
        "the learning-rate schedule is recomputed for the new length: the cosine decay now reaches min_lr 0.0003 at "
        "step 8 instead of step 6, and the warm-up (lr_warmup_fraction 0.5 of the run) is 4 steps instead of 3; the "
        f"next step (4) uses learning rate {plan.learning_rate(4, 3e-3, 3e-4):.4g} (the old plan: "
        f"{old_plan.learning_rate(4, 3e-3, 3e-4):.4g})"
    ]

    other = copy.deepcopy(old_doc)
    other["train"]["lr_warmup_fraction"] = 0.25
    train, plan, rec = record(other)
    check = ckpt.check_resume(info, rec, train=train, plan=plan)
    assert check.refused == [("schedule", "warm-up: 3 -> 2 optimizer steps")]
    assert ckpt.check_resume(info, rec, train=train, plan=plan, allow=["schedule"]).warnings == [
        "resume: accepted by resume_allow_changes (schedule): warm-up: 3 -> 2 optimizer steps"
    ]
