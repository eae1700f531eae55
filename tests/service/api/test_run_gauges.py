"""Per-run Prometheus gauges (issue 11): a running run's step, loss and tokens/s, labelled by
run id and name, appear on ``GET /metrics`` and are gone once the run ends."""

from __future__ import annotations

import uuid

from prometheus_client.parser import text_string_to_metric_families

from service import runs
from tests.support.api import ApiEnv, body


def _run_samples(env: ApiEnv) -> dict[tuple[str, str, str], float]:
    r = env.client.get("/metrics")
    assert r.status_code == 200
    return {
        (s.name, s.labels["run_id"], s.labels["name"]): s.value
        for family in text_string_to_metric_families(r.text)
        if family.name.startswith("moejobs_run_")
        for s in family.samples
    }


def test_running_runs_have_gauges_until_they_end(api: ApiEnv):
    ids = [uuid.UUID(api.client.post("/runs", json=body(f"g{i}")).json()["id"]) for i in range(3)]
    running, fresh, queued = ids
    with api.session() as s:
        for run_id in (running, fresh):
            claimed = runs.claim_run(s, run_id, "w1", lease_seconds=600)
            assert claimed is not None
        rows = [{"step": i, "loss": 4.0 - i / 10, "tokens_per_sec": 900.0 + i} for i in (1, 2, 3)]
        runs.record_metrics(s, running, rows, attempt=1)
    assert _run_samples(api) == {
        ("moejobs_run_step", str(running), "g0"): 3,
        ("moejobs_run_loss", str(running), "g0"): 3.7,
        ("moejobs_run_tokens_per_sec", str(running), "g0"): 903.0,
    }  # the run without a metric row yet and the queued one have none

    with api.session() as s:
        runs.transition(s, running, "succeeded", "done", attempt=1, exit_code=0)
        runs.record_metrics(s, fresh, [{"step": 1, "loss": 5.0}], attempt=1)
    assert _run_samples(api) == {
        ("moejobs_run_step", str(fresh), "g1"): 1,
        ("moejobs_run_loss", str(fresh), "g1"): 5.0,
    }
    with api.session() as s:
        runs.request_cancel(s, queued)
        runs.transition(s, fresh, "failed", "boom", attempt=1, reason="crashed", exit_code=1)
    assert _run_samples(api) == {}
