"""bench/gpu_check.sh cannot rot: its CPU rehearsal (GPU_CHECK_REHEARSAL=1: tiny sizes, the same steps,
the same outputs) runs here, so a change that breaks a step of the GPU check fails the test suite.

The rehearsal costs about 105 s of CPU time (mostly nine imports of torch + litgpt, one per step
process); it runs two steps at a time, so about a minute on an idle 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.support import REPO

ROOT = REPO
SCRIPT = ROOT / "bench" / "gpu_check.sh"

pytestmark = pytest.mark.slow

#: Every step of the GPU check, with the JSON document it leaves in $OUT (parity: a pytest log).
STEPS = {
    "parity": None,
    "moe_layer": "moe_layer.json",
    "moe_backends_32-true": "moe_backends_32-true.json",  # each expert backend forced
    "train_throughput": "train_throughput.json",
    "smoke": "smoke.json",
    "production": "production.json",
    "memory_check": "memory_check.json",
    "train_throughput_compiled": "train_throughput_compiled.json",
}


def test_gpu_check_script_parses():
    assert (
        subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True).returncode == 0
    )


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {
        **os.environ,
        "GPU_CHECK_REHEARSAL": "1",
        "PYTHON": sys.executable,
        "OUT": str(out),
        "GPU_CHECK_WORKDIR": str(out / "work"),
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=700
    )
    return proc, out


def test_rehearsal_runs_every_step(rehearsal):
    proc, out = rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert sorted(r[0] for r in rows) == sorted(STEPS)
    assert all(r[1] == "0" for r in rows), rows


def test_rehearsal_writes_each_steps_json(rehearsal):
    _, out = rehearsal
    docs = {name: json.loads((out / f).read_text()) for name, f in STEPS.items() if f}
    assert [r["tokens"] for r in docs["moe_layer"]["rows"]] == [64]
    assert all(r["loop_ms"] > 0 and r["grouped_ms"] > 0 for r in docs["moe_layer"]["rows"])
    # micro-batch 2 and the 'max' search's result (bounded at 4 on a CPU)
    assert [r["micro_batch"] for r in docs["train_throughput"]["rows"]] == [2, 4]
    for r in docs["train_throughput"]["rows"] + docs["train_throughput_compiled"]["rows"]:
        assert r["stock_tokens_per_s"] > 0 and r["engine_tokens_per_s"] > 0
    assert docs["smoke"]["steps"] == 1 and docs["smoke"]["peak_memory_bytes"] > 0
    prod = docs["production"]
    assert (prod["preset"], prod["steps"], prod["stopped_by"]) == ("production", 10, "completed")
    assert prod["gradient_checkpointing"] is True and prod["final_loss"] < prod["first_loss"]
    assert [r["config"] for r in docs["memory_check"]["rows"]] == ["cpu-tiny"]
    assert docs["memory_check"]["rows"][0]["measured_bytes"] > 0
    assert "passed" in (out / "parity.log").read_text()


def test_rehearsal_summary_has_every_section_filled(rehearsal):
    _, out = rehearsal
    md = (out / "gpu_check.md").read_text()
    for heading in (
        "### MoE layer",
        "### Training throughput (stock LitGPT eager",
        "### Smoke test",
        "### Production preset",
        "### Memory estimate",
        "### Training throughput (stock LitGPT compiled",
    ):
        section = md.split(heading, 1)[1].split("\n### ", 1)[0]
        assert "| " in section and "Error" not in section, section  # a table, not a load error
    for name in STEPS:
        assert f"| {name} | 0 |" in md
    parity = md.split("- parity tests:", 1)[1].split("\n", 1)[0]
    assert re.match(r" \d+ passed", parity) and "failed" not in parity, parity


def _run_with(tmp_path, python: str, **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """The script with PYTHON replaced by a stand-in command (``true``/``false``): its control flow only."""
    full = {
        **os.environ,
        "GPU_CHECK_REHEARSAL": "1",
        "PYTHON": python,
        "OUT": str(tmp_path),
        "GPU_CHECK_WORKDIR": str(tmp_path / "work"),
        **env,
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60
    )
    return proc, [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]


def test_a_failing_step_fails_the_check(tmp_path):
    proc, rows = _run_with(tmp_path, "false")
    assert proc.returncode == 1
    assert sorted(r[0] for r in rows) == sorted(STEPS) and all(r[1] == "1" for r in rows), rows
    assert "parity failed (exit 1" in proc.stdout


def test_steps_beyond_the_time_budget_are_skipped_and_fail_the_check(tmp_path):
    proc, rows = _run_with(
        tmp_path, "true", GPU_CHECK_BUDGET="25"
    )  # 5 s left after the summary's 20
    assert proc.returncode == 1
    # the optional last step (stock LitGPT compiled) is "not run" rather than failed
    assert {r[0]: r[1] for r in rows} == {
        **{name: "skipped" for name in STEPS},
        "train_throughput_compiled": "not run",
    }


def test_a_passing_run_exits_zero(tmp_path):
    proc, rows = _run_with(tmp_path, "true")
    assert proc.returncode == 0, proc.stdout
    assert {r[0]: r[1] for r in rows} == {name: "0" for name in STEPS}
