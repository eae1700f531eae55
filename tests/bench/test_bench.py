"""The benchmarks still run: each script with tiny settings on the CPU, its --json document
parsed. Figures are not checked (speed is measured in bench/, never asserted in tests); what
is checked is that the scripts work against the current engine and report both sides."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.slow


def _bench(*argv: str) -> dict:
    done = subprocess.run(
        [sys.executable, *argv, "--json"], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _rows(doc: dict) -> list[dict]:
    rows = doc["rows"] if isinstance(doc, dict) else doc
    assert rows, doc
    return rows


def test_moe_layer_benchmark_runs_both_layers():
    doc = _bench(
        "bench/moe_layer.py",
        "--device",
        "cpu",
        "--tokens",
        "64,128",
        "--iters",
        "2",
        "--warmup",
        "1",
    )
    rows = _rows(doc)
    assert [r["tokens"] for r in rows] == [64, 128]
    assert all(r["ratio"] > 0 for r in rows)


def test_moe_layer_benchmark_forces_each_backend():
    doc = _bench(
        "bench/moe_layer.py",
        "--device",
        "cpu",
        "--tokens",
        "64",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--backend",
        "grouped_mm,grouped_mm_sync,dense",
    )
    rows = _rows(doc)
    assert doc["backends"] == ["grouped_mm", "grouped_mm_sync", "dense"]
    assert [(r["backend"], r["forced"]) for r in rows] == [
        ("grouped_mm", True),
        ("grouped_mm_sync", True),
        ("dense", True),
    ]
    assert all(r["ratio"] > 0 and "error" not in r for r in rows)


def test_moe_layer_benchmark_rejects_an_unknown_backend():
    done = subprocess.run(
        [sys.executable, "bench/moe_layer.py", "--backend", "grouped_mm,triton"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "--backend: triton is not one of auto, grouped_mm, grouped_mm_sync, dense" in done.stderr


def test_train_throughput_benchmark_runs_stock_and_engine():
    doc = _bench(
        "bench/train_throughput.py",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--micro-batch",
        "2",
        "--seq-len",
        "32",
    )
    rows = _rows(doc)
    assert all(r["ratio"] > 0 for r in rows)


def test_memory_check_compares_the_estimate_with_a_measured_peak(tmp_path):
    doc = _bench(
        "bench/memory_check.py",
        "--only",
        "cpu-tiny",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--workdir",
        str(tmp_path),
    )
    (row,) = _rows(doc)
    assert row["config"] == "cpu-tiny" and row["exit"] == 0 and row["steps"] == 1
    assert row["measured_bytes"] > 2**28  # a real resident set: torch alone is ~0.5 GiB
    assert row["ratio"] == round(row["estimate_bytes"] / row["measured_bytes"], 3)
    assert (
        row["estimate"]["device_kind"] == "cpu"
        and row["estimate_bytes"] == row["estimate"]["total_cpu"]
    )


def test_api_load_benchmark_measures_the_app_and_the_bare_baseline():
    doc = _bench(
        "bench/api_load.py",
        "--backends",
        "sqlite",
        "--clients",
        "4",
        "--endpoints",
        "/runs,/runs/{id}",
        "--duration",
        "0.5",
        "--warmup",
        "0.2",
        "--runs",
        "2",
        "--steps",
        "10",
    )
    rows = _rows(doc)
    assert [(r["backend"], r["endpoint"]) for r in rows] == [
        ("bare", "/ping"),
        ("sqlite", "/runs"),
        ("sqlite", "/runs/{id}"),
    ]
    assert all(r["requests"] > 0 and r["ratio"] > 0 for r in rows)
    assert all(r["errors_5xx"] == r["timeouts"] == r["connection_errors"] == 0 for r in rows)
    assert all(r["status"] == {"200": sum(r["status"].values())} for r in rows)


def test_data_prep_benchmark_runs_engine_and_library():
    doc = _bench(
        "bench/data_prep.py",
        "--sizes-mb",
        "0.5",
        "--file-mb",
        "0.2",
        "--tokenizer-mb",
        "0.5",
        "--vocab-size",
        "1024",
    )
    (row,) = _rows(doc)
    assert row["files"] == 3 and row["tokens"] > 100_000
    assert row["engine_tokens_per_s"] > 0 and row["library_tokens_per_s"] > 0 and row["ratio"] > 0
    assert row["engine_prep_mb"] >= 0 and row["library_prep_mb"] >= 0
