"""Admission (``service.admission``) through the API, on real database rows (SQLite and
PostgreSQL): workers of different memory, a CPU host's shared memory, workers that reported no
memory, storage and time warnings, plans no machine could run, and the calibration of the
expected time per worker kind from finished runs."""

from __future__ import annotations

import copy
import re
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import select

from service import admission, contract, runs
from service.models import RunStatus, Throughput
from tests.support import REPO
from tests.support.api import MODEL, TRAIN, ApiEnv, body

#: A pair whose activations dominate what the run adds to the process's fixed runtime
#: (micro-batch 1024 x 64 tokens), so that a smaller micro-batch, or gradient checkpointing, can
#: fit where it does not: 10 optimizer steps (nothing trains in these tests).
BIG_BATCH_TRAIN: dict = {
    **TRAIN,
    "train": {
        **TRAIN["train"],
        "micro_batch_size": 1024,
        "global_batch_size": 2048,
        "max_seq_length": 64,
        "max_tokens": 2048 * 64 * 10,
    },
}


def _with(doc: dict, **section: Any) -> dict:
    out = copy.deepcopy(doc)
    for key, value in section.items():
        if isinstance(value, dict):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


def register(
    env: ApiEnv,
    worker_id: str,
    *,
    gpus: int = 0,
    gpu_memory: int | None = None,
    kind: str | None = None,
    host: str = "testhost",
    host_memory: int | None = None,
    free: int | None = None,
) -> None:
    """A live worker row as ``WorkerRuntime.register`` writes it."""
    with env.session() as s:
        runs.register_worker(
            s,
            worker_id,
            host,
            pid=1,
            kind=kind,
            host_memory_bytes=host_memory,
            free_bytes=free,
            gpus=[
                {"index": i, "name": kind or "GPU", "memory_bytes": gpu_memory} for i in range(gpus)
            ],
        )


def validate(env: ApiEnv, doc: dict) -> dict:
    r = env.client.post("/runs/validate", json=doc)
    assert r.status_code == 200, r.text
    return r.json()


def need_of(env: ApiEnv, doc: dict, device_kind: str = "cuda") -> int:
    """The estimate's memory per rank on a ``device_kind`` worker, as the API reports it
    (``estimate.memory.total_cuda`` / ``total_cpu``)."""
    report = validate(env, doc)
    assert report["valid"], report["errors"]
    return report["estimate"]["memory"][f"total_{device_kind}"]


def memory_warnings(doc: dict) -> list[str]:
    return [w["msg"] for w in doc["warnings"] if "per rank" in w["msg"]]


# -- memory ------------------------------------------------------------------------------------


def test_two_workers_of_different_memory(backend, make_api):
    env = make_api(backend, worker=False)
    register(env, "probe")  # no memory reported: only to read the estimate
    doc = body(train_config=BIG_BATCH_TRAIN)
    need = need_of(env, doc)
    assert need == validate(env, doc)["estimate"]["memory"]["total"]
    with env.session() as s:
        runs.deregister_worker(s, "probe")

    # fits the larger worker only, with room: accepted, no memory warning
    register(env, "small", gpus=1, gpu_memory=need // 2, kind="NVIDIA L4")
    register(env, "large", gpus=1, gpu_memory=need * 2, kind="NVIDIA H100 80GB HBM3")
    r = env.client.post("/runs", json=doc)
    assert r.status_code == 201, r.text
    assert memory_warnings(r.json()) == []
    assert r.json()["estimate"]["fleet"]["largest_worker"]["worker_id"] == "large"

    # within 0.9x..1.25x of the larger one: accepted with a warning naming it
    with env.session() as s:
        runs.register_worker(
            s,
            "large",
            "testhost",
            pid=1,
            kind="NVIDIA H100 80GB HBM3",
            gpus=[{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_bytes": int(need / 1.1)}],
        )
    r = env.client.post("/runs", json=doc)
    assert r.status_code == 201, r.text
    (msg,) = memory_warnings(r.json())
    assert "1.10x" in msg and "worker large (NVIDIA H100 80GB HBM3" in msg
    assert "has not been checked against a GPU" in msg

    # more than 1.25x both: refused, naming the estimate, the worker and what would fit
    cap = int(need / 1.5)
    with env.session() as s:
        runs.register_worker(
            s,
            "large",
            "testhost",
            pid=1,
            kind="NVIDIA H100 80GB HBM3",
            gpus=[{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_bytes": cap}],
        )
    r = env.client.post("/runs", json=doc)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["code"] == "unschedulable"
    (e,) = err["errors"]
    assert e["loc"] == ["body", "train_config", "train", "micro_batch_size"]
    assert "1.50x" in e["msg"] and "worker large" in e["msg"]
    assert admission.fmt_bytes(need) in e["msg"] and admission.fmt_bytes(cap) in e["msg"]
    m = re.search(r"micro_batch_size (\d+)", e["msg"].split("would fit with", 1)[1])
    assert m is not None, e["msg"]
    smaller = int(m.group(1))
    assert 1 <= smaller < 1024 and 2048 % smaller == 0
    # the suggestion is true: that micro-batch fits the worker
    fitted = _with(BIG_BATCH_TRAIN, train={"micro_batch_size": smaller})
    if "with gradient_checkpointing" in e["msg"].split("would fit with", 1)[1]:
        fitted["train"]["gradient_checkpointing"] = True
    assert env.client.post("/runs", json=body(train_config=fitted)).status_code == 201
    # /runs/validate says the same, as an invalid report
    report = validate(env, doc)
    assert report["valid"] is False and report["errors"][0]["type"] == "unschedulable"


def test_gradient_checkpointing_is_suggested_when_it_fits(make_api):
    env = make_api("sqlite", worker=False)
    register(env, "probe")
    doc = body(train_config=BIG_BATCH_TRAIN)
    need = need_of(env, doc)
    ckpt = need_of(
        env, body(train_config=_with(BIG_BATCH_TRAIN, train={"gradient_checkpointing": True}))
    )
    assert ckpt < need / 1.25
    with env.session() as s:
        runs.deregister_worker(s, "probe")
    register(env, "gpu", gpus=1, gpu_memory=ckpt + 1, kind="NVIDIA A100-SXM4-40GB")
    r = env.client.post("/runs", json=doc)
    assert r.status_code == 422
    msg = r.json()["errors"][0]["msg"]
    assert f"would fit with gradient_checkpointing: true ({admission.fmt_bytes(ckpt)})" in msg


def test_a_model_too_big_for_every_worker_names_the_model_config(make_api):
    env = make_api("sqlite", worker=False)
    register(env, "gpu", gpus=1, gpu_memory=1 << 20, kind="NVIDIA L4")  # 1 MiB
    r = env.client.post("/runs", json=body())
    assert r.status_code == 422
    (e,) = r.json()["errors"]
    assert e["loc"] == ["body", "model_config"]  # its weights and optimizer alone do not fit
    assert "no smaller micro_batch_size or gradient checkpointing fits" in e["msg"]
    assert "1.0 MiB per GPU" in e["msg"]


def test_a_cpu_workers_memory_is_its_hosts_shared_by_its_cpu_workers(backend, make_api):
    env = make_api(backend, worker=False)
    register(env, "probe")
    need = need_of(env, body(), "cpu")  # a CPU worker's host memory holds the whole process
    with env.session() as s:
        runs.deregister_worker(s, "probe")
    # one CPU host too small, even with two CPU workers on it (its memory is not summed)
    register(env, "box-1", kind="cpu: Test CPU", host="box", host_memory=int(need / 1.5))
    register(env, "box-2", kind="cpu: Test CPU", host="box", host_memory=int(need / 1.5))
    r = env.client.post("/runs", json=body())
    assert r.status_code == 422
    msg = r.json()["errors"][0]["msg"]
    assert "host memory, shared by 2 CPU workers of host box" in msg and "1.50x" in msg
    # a host with enough for one run but not for one per CPU worker: accepted, with a warning
    register(env, "big-1", kind="cpu: Test CPU", host="big", host_memory=int(need * 1.5))
    register(env, "big-2", kind="cpu: Test CPU", host="big", host_memory=int(need * 1.5))
    r = env.client.post("/runs", json=body())
    assert r.status_code == 201, r.text
    (msg,) = memory_warnings(r.json())
    assert "only while the other CPU workers of that host" in msg and "host big" in msg
    # one CPU worker on a host with plenty: nothing to say
    register(env, "roomy", kind="cpu: Test CPU", host="roomy", host_memory=need * 10)
    r = env.client.post("/runs", json=body())
    assert r.status_code == 201 and memory_warnings(r.json()) == []


def test_workers_that_reported_no_memory_never_refuse(backend, make_api):
    env = make_api(backend, worker=False)
    register(env, "unknown-cpu")  # a worker from before 0003: no memory, no kind
    r = env.client.post("/runs", json=body())
    assert r.status_code == 201 and memory_warnings(r.json()) == []
    assert r.json()["estimate"]["fleet"]["largest_worker"] is None
    # a too-small worker next to one of unknown size: queued, saying why
    register(env, "tiny-gpu", gpus=1, gpu_memory=1 << 20, kind="NVIDIA L4")
    register(env, "unknown-gpu", gpus=1, gpu_memory=None, kind="NVIDIA H100")
    r = env.client.post("/runs", json=body())
    assert r.status_code == 201, r.text
    (msg,) = memory_warnings(r.json())
    assert "reported no memory" in msg and "worker tiny-gpu" in msg


def test_allow_unschedulable_queues_a_run_too_big_for_the_fleet(make_api):
    env = make_api("sqlite", worker=False, allow_unschedulable=True)
    register(env, "gpu", gpus=1, gpu_memory=1 << 20, kind="NVIDIA L4")
    r = env.client.post("/runs", json=body())
    assert r.status_code == 201
    assert any(
        "queued anyway: MOEJOBS_ALLOW_UNSCHEDULABLE" in w["msg"] and "worker gpu" in w["msg"]
        for w in r.json()["warnings"]
    )


# -- storage and time --------------------------------------------------------------------------


def test_checkpoints_beyond_the_free_space_are_a_warning(make_api):
    env = make_api("sqlite", worker=False, keep_checkpoints=1)
    register(env, "probe")
    est = validate(env, body())["estimate"]
    with env.session() as s:
        runs.deregister_worker(s, "probe")
    one = est["checkpoint_with_optimizer_bytes"]
    assert est["checkpoints_written"] == 4  # save_interval 5 over 20 steps: 3 + final
    assert est["fleet"]["kept_checkpoint_bytes"] == 2 * one  # retention 1 + the one being written
    register(env, "cpu", kind="cpu: Test CPU", host_memory=1 << 40, free=2 * one + 1)
    r = env.client.post("/runs", json=body())
    assert r.status_code == 201 and not [w for w in r.json()["warnings"] if "RUNS_DIR" in w["msg"]]
    with env.session() as s:
        runs.heartbeat_worker(s, "cpu", free_bytes=2 * one - 1)
    r = env.client.post("/runs", json=body())
    assert r.status_code == 201
    (msg,) = [w["msg"] for w in r.json()["warnings"] if "RUNS_DIR" in w["msg"]]
    assert "MOEJOBS_KEEP_CHECKPOINTS 1" in msg and "no_space" in msg and "worker cpu" in msg


def test_a_run_longer_than_the_bound_is_a_warning(make_api):
    env = make_api("sqlite", worker=False, long_run_seconds=1e-9)
    register(env, "gpu", gpus=1, gpu_memory=80 << 30, kind="NVIDIA H100 80GB HBM3")
    r = env.client.post("/runs", json=body())
    assert r.status_code == 201
    (msg,) = [w["msg"] for w in r.json()["warnings"] if "LONG_RUN_SECONDS" in w["msg"]]
    assert "NVIDIA H100 80GB HBM3, datasheet" in msg


def _finish_a_run(
    env: ApiEnv, doc: dict, worker_id: str, *, tokens: int, seconds: float
) -> uuid.UUID:
    """Submit ``doc`` and play a worker that trains it: claim, metric rows, succeeded."""
    r = env.client.post("/runs", json=doc)
    assert r.status_code == 201, r.text
    run_id = uuid.UUID(r.json()["id"])
    with env.session() as s:
        assert runs.claim_run(s, run_id, worker_id, 60) is not None
        runs.record_metrics(
            s,
            run_id,
            [
                {"step": 1, "tokens": tokens // 2, "elapsed_s": seconds / 2, "loss": 5.0},
                {"step": 2, "tokens": tokens, "elapsed_s": seconds, "loss": 4.0},
            ],
            attempt=1,
        )
        runs.transition(s, run_id, RunStatus.succeeded, "done", attempt=1)
    return run_id


def test_expected_time_per_worker_kind_measured_then_datasheet(backend, make_api):
    env = make_api(backend, worker=False)
    register(env, "h100", gpus=1, gpu_memory=80 << 30, kind="NVIDIA H100 80GB HBM3")
    register(env, "cpu", kind="cpu: Test CPU", host_memory=64 << 30)
    est = validate(env, body())["estimate"]
    times = {e["kind"]: e for e in est["fleet"]["time"]}
    h100 = times["NVIDIA H100 80GB HBM3"]
    peak = contract.peak_flops_per_device("NVIDIA H100 80GB HBM3", "32-true")
    assert peak == 494.7e12  # the TF32 datasheet peak for 32-true
    assert h100["source"] == "datasheet" and h100["time_s"] == pytest.approx(
        est["total_flops"] / (peak * est["mfu"])
    )
    cpu = times["cpu: Test CPU"]
    assert cpu["source"] == "none" and cpu["time_s"] is None and "no figure yet" in cpu["basis"]
    assert [e["kind"] for e in est["fleet"]["time"]][-1] == "cpu: Test CPU"  # no figure: last

    # a run of this model config finishes on the CPU worker: 1000 tokens/s
    run_id = _finish_a_run(env, body(), "cpu", tokens=20_000, seconds=20.0)
    with env.session() as s:
        (row,) = s.exec(select(Throughput)).all()
        assert (row.worker_kind, row.runs, row.last_run_id) == ("cpu: Test CPU", 1, run_id)
        assert row.tokens_per_sec_per_device == pytest.approx(1000.0)
        assert row.flops_per_sec_per_device == pytest.approx(1000.0 * est["flops_per_token"])
    est = validate(env, body())["estimate"]
    times = {e["kind"]: e for e in est["fleet"]["time"]}
    assert times["cpu: Test CPU"]["source"] == "measured"
    assert times["cpu: Test CPU"]["time_s"] == pytest.approx(est["plan"]["tokens_trained"] / 1000)
    assert times["NVIDIA H100 80GB HBM3"]["source"] == "datasheet"
    # a second run at 3000 tokens/s: the mean of the two
    _finish_a_run(env, body(), "cpu", tokens=60_000, seconds=20.0)
    est = validate(env, body())["estimate"]
    cpu = {e["kind"]: e for e in est["fleet"]["time"]}["cpu: Test CPU"]
    assert cpu["time_s"] == pytest.approx(est["plan"]["tokens_trained"] / 2000)
    assert "2 finished run(s)" in cpu["basis"]

    # another model config on the same kind: scaled by the FLOP/s the first one reached
    other = body(model_config={**MODEL, "n_layer": 4})
    est2 = validate(env, other)["estimate"]
    cpu2 = {e["kind"]: e for e in est2["fleet"]["time"]}["cpu: Test CPU"]
    assert cpu2["source"] == "scaled"
    assert cpu2["time_s"] == pytest.approx(est2["total_flops"] / (2000 * est["flops_per_token"]))
    # a different precision is a different model config identity
    bf16 = body(train_config={**TRAIN, "precision": "bf16-true"})
    cpu3 = {e["kind"]: e for e in validate(env, bf16)["estimate"]["fleet"]["time"]}["cpu: Test CPU"]
    assert cpu3["source"] == "scaled"


def test_no_calibration_without_metrics_or_worker_kind(make_api):
    env = make_api("sqlite", worker=False)
    register(env, "anon", host_memory=64 << 30)  # no kind: nothing to file the speed under
    _finish_a_run(env, body(), "anon", tokens=1000, seconds=1.0)
    register(env, "cpu", kind="cpu: Test CPU")
    r = env.client.post("/runs", json=body())
    run_id = uuid.UUID(r.json()["id"])
    with env.session() as s:  # succeeded without metric rows
        runs.claim_run(s, run_id, "cpu", 60)
        runs.transition(s, run_id, RunStatus.succeeded, "done", attempt=1)
        assert s.exec(select(Throughput)).all() == []


# -- plans no machine could run ----------------------------------------------------------------


ABSURD = [
    pytest.param(
        {
            "model_config": {
                **MODEL,
                "n_embd": 65536,
                "n_layer": 1000,
                "n_head": 64,
                "n_query_groups": 8,
                "moe_intermediate_size": 262144,
            }
        },
        ["body", "model_config"],
        "more than 1e+13",
        id="3-PiB-model",
    ),
    pytest.param(
        {"model_config": {**MODEL, "n_embd": 10**12}},
        ["body", "model_config"],
        "n_embd 1e+12",
        id="n_embd-1e12",
    ),
    pytest.param(
        {
            "train_config": {
                **TRAIN,
                "train": {**TRAIN["train"], "max_tokens": 10**18, "save_interval": 500},
            }
        },
        ["body", "train_config", "train", "max_tokens"],
        "max_tokens 1e+18 plans",
        id="max_tokens-1e18",
    ),
    pytest.param(
        {
            "train_config": {
                **TRAIN,
                "train": {
                    **TRAIN["train"],
                    "micro_batch_size": 2**31,
                    "global_batch_size": 2**31,
                    "max_seq_length": 64,
                    "max_tokens": 2**37,
                },
            }
        },
        ["body", "train_config", "train", "micro_batch_size"],
        "which no machine has",
        id="1-PiB-of-activations",
    ),
]


@pytest.mark.parametrize("change, loc, text", ABSURD)
def test_plans_no_machine_could_run_are_refused_even_with_allow_unschedulable(
    make_api, change, loc, text
):
    env = make_api("sqlite", worker=False, allow_unschedulable=True)  # and no worker live
    r = env.client.post("/runs", json=body(**change))
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "unschedulable"
    errors = r.json()["errors"]
    assert errors[0]["loc"] == loc and text in errors[0]["msg"]
    report = validate(env, body(**change))
    assert report["valid"] is False and report["errors"] == errors
    assert env.client.get("/runs").json()["items"] == []


def test_max_tokens_1e18_names_steps_and_checkpoints(make_api):
    env = make_api("sqlite", worker=False)
    doc = body(
        train_config={
            **TRAIN,
            "train": {**TRAIN["train"], "max_tokens": 10**18, "save_interval": 500},
        }
    )
    errors = env.client.post("/runs", json=doc).json()["errors"]
    assert [e["loc"][-1] for e in errors] == ["max_tokens", "save_interval"]
    assert "7.81e+15 optimizer steps" in errors[0]["msg"]
    assert "1.56e+13 checkpoints" in errors[1]["msg"]


def test_absurd_bounds_leave_real_configs_alone():
    """The bounds are far beyond anything trainable: the shipped configs and presets pass."""
    from service.config.merge import resolve_documents
    from service.config.presets import list_presets
    from service.config.validate import validate_configs
    from service.estimate import estimate

    configs = REPO / "configs"
    layers = [(None, None)] + [(None, name) for name in list_presets()]
    seen = 0
    for _, preset in layers:
        train, model = resolve_documents(
            configs / "train_config.yaml", configs / "model_config.yaml", preset
        )
        v = validate_configs(train, model)
        est = estimate(v.train, v.model)
        assert admission.absurd_errors(v, est) == [], preset
        assert est.params.total < admission.MAX_PARAMETERS / 1000
        seen += 1
    assert seen >= 3


@pytest.mark.parametrize("value", [2**62, 2**63 - 1])
def test_int64_sizes_in_any_field_are_answered_not_crashed_on(make_api, value):
    """Every size field at the int64 limit, alone: a 200 report or a 422, never a 500, with
    live workers that reported everything (so every rule runs)."""
    env = make_api("sqlite", worker=False)
    register(env, "gpu", gpus=1, gpu_memory=80 << 30, kind="NVIDIA H100", free=1 << 40)
    register(env, "cpu", kind="cpu: Test CPU", host_memory=64 << 30, free=1 << 40)
    docs = [
        body(model_config={**MODEL, f: value})
        for f in (
            "n_embd",
            "vocab_size",
            "padded_vocab_size",
            "n_expert",
            "n_expert_per_token",
            "moe_intermediate_size",
            "block_size",
            "n_head",
            "n_query_groups",
            "head_size",
        )
    ]
    docs += [
        body(train_config={**TRAIN, "train": {**TRAIN["train"], f: value}})
        for f in (
            "micro_batch_size",
            "global_batch_size",
            "max_tokens",
            "max_seq_length",
            "save_interval",
            "max_steps",
            "lr_warmup_steps",
        )
    ]
    for doc in docs:
        r = env.client.post("/runs/validate", json=doc)
        assert r.status_code == 200, r.text
        r = env.client.post("/runs", json=doc)
        assert r.status_code in (201, 422), r.text


def test_each_worker_is_compared_with_the_need_on_its_own_device_kind(backend, make_api):
    """A CPU worker's host memory is compared with the CPU peak (resident set), a GPU's memory
    with the GPU peak: the two estimates differ, and the worker with the most room decides."""
    env = make_api(backend, worker=False)
    register(env, "probe")
    cpu_need, gpu_need = need_of(env, body(), "cpu"), need_of(env, body(), "cuda")
    assert cpu_need != gpu_need
    with env.session() as s:
        runs.deregister_worker(s, "probe")
    # memory sized between the two needs: the worker whose kind needs less fits, the other not
    low, high = sorted([cpu_need, gpu_need])
    size = int(low * 1.3) if low * 1.3 < high / 1.3 else (low + high) // 2
    register(env, "cpu-box", kind="cpu: Test CPU", host="cpu-box", host_memory=size)
    register(env, "gpu-box", gpus=1, gpu_memory=size, kind="NVIDIA L4", host="gpu-box")
    r = env.client.post("/runs/validate", json=body())
    fleet = r.json()["estimate"]["fleet"]
    fits = "cpu-box" if cpu_need < gpu_need else "gpu-box"
    assert fleet["largest_worker"]["worker_id"] == fits
    assert fleet["largest_worker"]["device_kind"] == ("cpu" if fits == "cpu-box" else "cuda")
    assert fleet["memory_per_rank_bytes"] == low
    # alone, the other worker is judged on its own kind's figure
    with env.session() as s:
        runs.deregister_worker(s, fits)
    r = env.client.post("/runs/validate", json=body())
    other = r.json()["estimate"]["fleet"]["largest_worker"]
    assert other["memory_per_rank_bytes"] == high
    assert other["ratio"] == pytest.approx(high / size)


def test_a_failure_to_record_the_speed_never_undoes_a_success(backend, make_api, caplog):
    """Calibration is a by-product: with the throughput table away while the run finishes (a
    real database error in its upsert), the run still moves to succeeded and it is logged."""
    env = make_api(backend, worker=False)
    register(env, "cpu", kind="cpu: Test CPU", host_memory=64 << 30)
    r = env.client.post("/runs", json=body())
    assert r.status_code == 201, r.text
    run_id = uuid.UUID(r.json()["id"])
    with env.session() as s:
        s.execute(sa.text("ALTER TABLE throughput RENAME TO throughput_away"))
        s.commit()
    try:
        with env.session() as s:
            assert runs.claim_run(s, run_id, "cpu", 60) is not None
            runs.record_metrics(
                s, run_id, [{"step": 1, "tokens": 1000, "elapsed_s": 2.0, "loss": 5.0}], attempt=1
            )
            moved = runs.transition(s, run_id, RunStatus.succeeded, "done", attempt=1)
            assert moved.status == RunStatus.succeeded
    finally:
        with env.session() as s:
            s.execute(sa.text("ALTER TABLE throughput_away RENAME TO throughput"))
            s.commit()
    assert env.client.get(f"/runs/{run_id}").json()["status"] == "succeeded"
    assert any("could not be recorded for calibration" in r.getMessage() for r in caplog.records)
    with env.session() as s:
        assert s.exec(select(Throughput)).all() == []


def test_the_near_capacity_warning_says_why_for_the_workers_device_kind(make_api):
    env = make_api("sqlite", worker=False)
    register(env, "probe")
    need = need_of(env, body(), "cpu")
    with env.session() as s:
        runs.deregister_worker(s, "probe")
    register(env, "cpu", kind="cpu: Test CPU", host="box", host_memory=int(need / 1.1))
    r = env.client.post("/runs/validate", json=body())
    (msg,) = memory_warnings(r.json())
    assert "1.10x" in msg and "(host memory on a CPU)" in msg
    assert "within about 15% of measured peaks" in msg and "GPU" not in msg
