"""Memory estimate vs measured peak: a few real training steps per config, each in its own process.

For each config the bench merges the config layers (``service.config.merge.resolve_documents``), writes
the merged documents as JSON into ``--workdir`` and trains them with ``run_train.py``'s command line
(``cli.train.main``) in a child process, so the estimate (``service.estimate.estimate`` of the very
same documents) and the run cannot disagree about the config. The demo corpus and tokenizer
(``moejobs seed-data``) are written under ``--workdir`` once; nothing is downloaded.

Configs (``--only``/``--skip`` take these names, comma separated):

* ``default``: configs/*.yaml as shipped (MoE-200M, 549M parameters, bf16-mixed, compiled, micro-batch
  4 x 512), with ``--accumulate`` micro-batches per optimizer step (default 2, shipped 32) and
  ``max_tokens`` for ``--steps`` steps. The tensors at the peak do not depend on the number of
  micro-batches (the gradients are allocated once and accumulated in place), but on a CPU the
  resident set creeps up as a run goes on (glibc keeps freed memory): 13.9 GiB after 6 micro-batches,
  15.0 after 16, 16.1 after the whole run's 128 (bench/RESULTS.md).
* ``smoke``: the spec's smoke test (``--smoke-test``: MoE-200M, 32-true, one step of 64 tokens).
* ``cpu-tiny``: the ``cpu-tiny`` preset (2.8M parameters, 32-true, eager), ``--steps`` steps, with
  its validation.
* ``production``: "production-like": the ``production`` preset (gradient checkpointing, global batch
  256, MoE-200M, bf16-mixed, compiled) with what a CPU needs (``flash_attention_force`` and
  ``disable_math_fallback`` off: the CPU has no flash kernels; ``compile_mode: default``:
  max-autotune's GEMM search takes far longer than the run on a CPU), global batch 8 and ``--steps``
  steps.

Measured, per config:

* CPU: the child's peak resident set size (``VmHWM`` of /proc/self/status at its end, the same as
  its ``ru_maxrss``), i.e. what the kernel's OOM killer and a cgroup limit see. This is what ``memory.total_cpu`` estimates.
* CUDA: ``torch.cuda.max_memory_reserved()`` (the caching allocator's peak, what an OOM is about)
  plus the device memory the process holds outside the allocator (CUDA context, kernels), measured
  at the end as ``mem_get_info`` used - ``memory_reserved()``. This is what ``memory.total_cuda``
  estimates.
* time per step: the median of the differences of ``metrics.csv``'s ``elapsed_s`` after the first
  step (the first step, compilation included, is reported apart).

The default MoE-200M needs ~15-16 GiB of RAM on a CPU: on the shared machine run the big configs under
``flock /tmp/moejobs-big.lock`` and alone.

    uv run python bench/memory_check.py --only cpu-tiny                # seconds
    flock /tmp/moejobs-big.lock uv run python bench/memory_check.py     # all four: 10-15 min on 2 quiet CPU cores
    python bench/memory_check.py --device cuda --json                  # bench/gpu_check.sh
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ("default", "smoke", "cpu-tiny", "production")
MARK = "MEMCHECK "


def layers(name: str, steps: int, accumulate: int = 2) -> dict:
    """``resolve_documents`` keyword arguments for config ``name`` run for ``steps`` optimizer steps of
    ``accumulate`` micro-batches (default and production; cpu-tiny and smoke keep theirs)."""
    gbs = 4 * accumulate
    base = {
        "resume": False,
        "eval": {"interval": 0, "final_validation": False, "initial_validation": False},
    }
    if name == "default":
        return {
            "train_overrides": {
                **base,
                "train": {"global_batch_size": gbs, "max_tokens": steps * gbs * 512},
            }
        }
    if name == "smoke":
        return {"smoke_test": True, "train_overrides": {"resume": False}}
    if name == "cpu-tiny":
        return {
            "preset": "cpu-tiny",
            "train_overrides": {
                "resume": False,
                "train": {"max_tokens": steps * 8 * 128, "save_interval": None},
            },
        }
    if name == "production":
        return {
            "preset": "production",
            "train_overrides": {
                **base,
                "train": {"global_batch_size": gbs, "max_tokens": steps * gbs * 512},
                "optimization": {
                    "flash_attention_force": False,
                    "disable_math_fallback": False,
                    "compile_mode": "default",
                },
            },
        }
    raise ValueError(f"unknown config {name!r}; valid: {', '.join(CONFIGS)}")


def _child(argv: list[str]) -> int:
    """Train ``argv`` (run_train.py's flags) in this process, then print the device's peaks."""
    from cli.train import main

    code = main(argv)
    doc: dict = {"exit": code}
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                doc["vmhwm_bytes"] = int(line.split()[1]) * 1024
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        reserved = torch.cuda.memory_reserved()
        doc.update(
            cuda_max_reserved=torch.cuda.max_memory_reserved(),
            cuda_max_allocated=torch.cuda.max_memory_allocated(),
            cuda_outside_allocator=max(0, total - free - reserved),
        )
    print(MARK + json.dumps(doc), flush=True)
    return code


def measure(
    name: str, steps: int, accumulate: int, work: Path, device_kind: str, timeout: float
) -> dict:
    """Run config ``name`` in a child process; the row of the table (estimate, measured, ratio)."""
    from service.config.merge import resolve_documents
    from service.config.validate import validate_configs
    from service.estimate import estimate
    from worker.metrics import read_metrics

    train, model = resolve_documents(
        ROOT / "configs" / "train_config.yaml",
        ROOT / "configs" / "model_config.yaml",
        **layers(name, steps, accumulate),
    )
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    train["out_dir"] = str(out)
    (work / f"{name}.train.json").write_text(json.dumps(train, indent=1))
    (work / f"{name}.model.json").write_text(json.dumps(model, indent=1))
    v = validate_configs(train, model)
    est = estimate(v.train, v.model, device_kind=device_kind)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--",
        "--config",
        str(work / f"{name}.train.json"),
        "--model-config",
        str(work / f"{name}.model.json"),
    ]
    if name == "smoke":
        cmd.append(
            "--smoke-test"
        )  # same overrides again, and no checkpoint (as run_train.py --smoke-test)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    # the child reports its own peak (VmHWM): RUSAGE_CHILDREN's ru_maxrss is the largest child so far,
    # which would hide a smaller config run after a larger one
    report: dict[str, Any] = next(
        (json.loads(line[len(MARK) :]) for line in stdout.splitlines() if line.startswith(MARK)), {}
    )
    row: dict = {
        "config": name,
        "model": v.model.name,
        "params": est.params.total,
        "precision": v.train.precision,
        "compile": v.train.optimization.compile,
        "checkpointing": v.train.train.gradient_checkpointing,
        "micro_batch": v.train.train.micro_batch_size,
        "seq_len": est.plan.seq_len,
        "steps": est.plan.optimizer_steps,
        "exit": report.get("exit", proc.returncode),
        "wall_s": round(wall, 1),
        "estimate_bytes": est.memory.total,
        "estimate": asdict(est.memory),
    }
    if device_kind == "cuda":
        if "cuda_max_reserved" in report:
            row["measured_bytes"] = report["cuda_max_reserved"] + report["cuda_outside_allocator"]
            row.update(
                {
                    k: report[k]
                    for k in ("cuda_max_reserved", "cuda_max_allocated", "cuda_outside_allocator")
                }
            )
    else:
        row["measured_bytes"] = report.get("vmhwm_bytes")
    if row.get("measured_bytes"):
        row["ratio"] = round(est.memory.total / row["measured_bytes"], 3)
    rows = read_metrics(out / "metrics.csv") if (out / "metrics.csv").exists() else []
    elapsed = [float(r["elapsed_s"]) for r in rows if r.get("elapsed_s")]
    if elapsed:
        row["first_step_s"] = round(elapsed[0], 2)
        diffs = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]
        row["step_s"] = round(statistics.median(diffs), 2) if diffs else None
    if row["exit"] != 0:
        row["error"] = (stderr.strip().splitlines() or ["?"])[-1][:300]
    shutil.rmtree(out, ignore_errors=True)
    return row


def _gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| config | model | precision | compile | ckpt | micro-batch x seq | estimate GiB | measured GiB | "
        "estimate/measured | first step s | step s |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['model']} | {r['precision']} | {r['compile']} | {r['checkpointing']} | "
            f"{r['micro_batch']} x {r['seq_len']} | {_gib(r['estimate_bytes'])} | {_gib(r.get('measured_bytes'))} | "
            f"{r.get('ratio', '-')} | {r.get('first_step_s', '-')} | {r.get('step_s') or '-'} |"
            + (f" error: {r['error']}" if r.get("error") else "")
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--only", default=None, help=f"comma-separated configs to run ({', '.join(CONFIGS)})"
    )
    p.add_argument("--skip", default="", help="comma-separated configs to skip")
    p.add_argument(
        "--steps", type=int, default=3, help="optimizer steps per config (smoke: always 1)"
    )
    p.add_argument(
        "--accumulate",
        type=int,
        default=2,
        help="micro-batches per optimizer step for default and production (shipped: 32)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="what to measure (default: cuda when available, else cpu)",
    )
    p.add_argument("--workdir", default="/tmp/moejobs-memcheck")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per config")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument(
        "--out",
        default=None,
        help="also write the JSON document here, after each config "
        "(what finished survives a timeout)",
    )
    args = p.parse_args(argv)
    names = [
        n
        for n in (args.only.split(",") if args.only else CONFIGS)
        if n and n not in args.skip.split(",")
    ]
    for n in names:
        layers(n, 1)  # unknown names fail before anything runs
    import torch

    from cli.data import seed_demo_data

    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    seed_demo_data(work)
    head = {
        "benchmark": "memory_check",
        "device": kind,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if kind == "cuda":
        head["gpu"] = torch.cuda.get_device_name()
    rows = []
    for n in names:
        row = measure(n, args.steps, args.accumulate, work, kind, args.timeout)
        rows.append(row)
        print(
            f"{n}: estimate {_gib(row['estimate_bytes'])} GiB, measured {_gib(row.get('measured_bytes'))} GiB, "
            f"ratio {row.get('ratio', '-')}, exit {row['exit']}",
            file=sys.stderr,
            flush=True,
        )
        if args.out:
            Path(args.out).write_text(json.dumps({**head, "rows": rows}, indent=1))
    if args.json:
        print(json.dumps({**head, "rows": rows}, indent=1))
    else:
        print(" ".join(f"{k}={v}" for k, v in head.items()))
        print(table(rows))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
