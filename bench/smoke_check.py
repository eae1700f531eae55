"""The spec's smoke test through the real engine: wall time (compilation included) and peak memory
against ``service.estimate``'s ``memory.total`` for the device (CPU: peak resident set size;
CUDA: ``max_memory_reserved`` plus the memory outside the allocator, the CUDA context).

It builds a small corpus from the Python standard library's own sources (``worker.corpus``) and a
byte-level BPE tokenizer on it (``worker.tokenizer``) under ``--workdir``, resolves the shipped
configs with the smoke-test overrides (``service.config.merge.resolve(..., smoke_test=True)``) and calls
``worker.train.run_training`` without checkpoints. Prints one JSON document (or a small table).

The smoke test of the default MoE-200M model needs ~9.2 GiB of RAM on a CPU (32-true, one step): on
the shared CPU machine run it under ``flock /tmp/moejobs-big.lock``. ``--preset cpu-tiny`` checks the script cheaply.

    python bench/smoke_check.py --json                  # on the GPU machine (bench/gpu_check.sh)
    flock /tmp/moejobs-big.lock uv run python bench/smoke_check.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/tmp/moejobs-smoke")
    p.add_argument("--preset", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from cli.data import seed_demo_data
    from service.config.merge import resolve
    from service.estimate import estimate
    from worker.train import run_training

    work = Path(args.workdir)
    t0 = time.perf_counter()
    demo = seed_demo_data(work)  # the demo corpus and 4,096-id tokenizer, as `moejobs seed-data`
    train_dir, val_dir, tok_dir = demo["train"], demo["val"], demo["tokenizer"]
    prep_s = time.perf_counter() - t0
    overrides = {
        "out_dir": str(work / "out"),
        "tokenizer_dir": str(tok_dir),
        "data": {"init_args": {"train_data_path": str(train_dir), "val_data_path": str(val_dir)}},
    }
    v = resolve(
        ROOT / "configs" / "train_config.yaml",
        ROOT / "configs" / "model_config.yaml",
        preset=args.preset,
        smoke_test=True,
        train_overrides=overrides,
    )
    cuda = torch.cuda.is_available()
    est = estimate(v.train, v.model, device_kind="cuda" if cuda else "cpu")
    t1 = time.perf_counter()
    result = run_training(v.train, v.model, write_checkpoints=False)
    wall = time.perf_counter() - t1
    peak = result.peak_memory_bytes  # CPU: peak resident set size, what memory.total_cpu estimates
    if (
        cuda
    ):  # what memory.total_cuda estimates: the allocator's peak reservation + memory outside it
        free, total = torch.cuda.mem_get_info()
        peak = torch.cuda.max_memory_reserved() + max(
            0, total - free - torch.cuda.memory_reserved()
        )
    doc = {
        "benchmark": "smoke_test",
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "model": v.model.name,
        "precision": v.train.precision,
        "compile": v.train.optimization.compile,
        "data_and_tokenizer_s": round(prep_s, 2),
        "train_wall_s": round(wall, 2),
        "engine_elapsed_s": round(result.elapsed_s, 2),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "peak_memory_bytes": peak,
        "peak_allocated_bytes": result.peak_memory_bytes if cuda else None,
        "estimate_memory_bytes": int(est.memory.total),
        "peak_over_estimate": round(peak / est.memory.total, 3)
        if peak and est.memory.total
        else None,
    }
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        for k, val in doc.items():
            print(f"{k:24s} {val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
