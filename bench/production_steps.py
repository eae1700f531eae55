"""The first optimizer steps of a preset (default: ``production``, 50 steps) through the real engine:
loss, steady tokens/s, MFU against the datasheet peak, wall time (compilation included) and peak
memory against ``service.estimate``'s ``memory.total`` for the device.

It uses the same corpus and tokenizer as ``bench/smoke_check.py`` (built under ``--workdir`` from the
Python standard library's sources, reused when present), resolves the shipped configs with the preset
and ``train.max_steps = --steps`` (plus ``train.max_time`` when ``--max-time`` is given, so a slow
compile still reports the steps it finished), and calls ``worker.train.run_training`` without
checkpoints. Prints one JSON document (or a small table).

The production preset forces flash attention and bf16, so it runs only on a CUDA GPU. ``--tiny`` is
the CPU rehearsal of ``bench/gpu_check.sh``: the same preset with cpu-tiny's model and the overrides
a CPU needs (32-true, no forced flash kernel, no compile, micro-batch 2 x 64 tokens, 2 micro-batches
per step), so the script's path is exercised in CI in seconds.

    python bench/production_steps.py --json --max-time 150     # on the GPU machine (bench/gpu_check.sh)
    uv run python bench/production_steps.py --tiny --steps 10  # a CPU check of the script
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: What ``--tiny`` puts over the preset so that it runs on a CPU in seconds.
TINY_TRAIN = {
    "precision": "32-true",
    "train": {
        "micro_batch_size": 2,
        "global_batch_size": 4,
        "max_seq_length": 64,
        "lr_warmup_steps": 2,
    },
    "optimization": {
        "compile": False,
        "flash_attention_force": False,
        "disable_math_fallback": False,
    },
}


def steady_tokens_per_s(rows: list[dict]) -> float | None:
    """Tokens/s between the step after warm-up (a quarter of the rows, at most 5) and the last row.

    Args:
        rows: metrics.csv rows (``step``, ``tokens``, ``elapsed_s``; values may be None).
    Returns:
        tokens per second of wall time over those steps, or None with fewer than 2 usable rows.
    """
    rows = [r for r in rows if r.get("tokens") is not None and r.get("elapsed_s") is not None]
    if len(rows) < 2:
        return None
    first = rows[min(5, len(rows) // 4)] if len(rows) > 2 else rows[0]
    last = rows[-1]
    dt = float(last["elapsed_s"]) - float(first["elapsed_s"])
    return (float(last["tokens"]) - float(first["tokens"])) / dt if dt > 0 else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="production")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps (train.max_steps)")
    p.add_argument(
        "--max-time",
        type=float,
        default=None,
        help="seconds of training after which the run stops at a step boundary (train.max_time)",
    )
    p.add_argument(
        "--tiny", action="store_true", help="CPU rehearsal: cpu-tiny's model, CPU overrides"
    )
    p.add_argument("--workdir", default="/tmp/moejobs-smoke")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from cli.data import seed_demo_data
    from service.config.merge import deep_merge, resolve
    from service.config.presets import load_preset
    from service.estimate import estimate
    from worker.train import run_training

    work = Path(args.workdir)
    t0 = time.perf_counter()
    demo = seed_demo_data(work)  # the demo corpus and 4,096-id tokenizer, as `moejobs seed-data`
    train_dir, val_dir, tok_dir = demo["train"], demo["val"], demo["tokenizer"]
    prep_s = time.perf_counter() - t0
    overrides: dict[str, Any] = {
        "out_dir": str(work / f"out-{Path(args.preset).stem}"),
        "resume": False,
        "tokenizer_dir": str(tok_dir),
        "data": {"init_args": {"train_data_path": str(train_dir), "val_data_path": str(val_dir)}},
        "train": {"max_steps": args.steps},
        "eval": {"interval": 0, "initial_validation": False, "final_validation": False},
    }
    if args.max_time:
        overrides["train"]["max_time"] = args.max_time
    model_overrides = None
    if args.tiny:
        overrides = deep_merge(TINY_TRAIN, overrides)
        model_overrides = load_preset("cpu-tiny")["model_config"]
    v = resolve(
        ROOT / "configs" / "train_config.yaml",
        ROOT / "configs" / "model_config.yaml",
        preset=args.preset,
        train_overrides=overrides,
        model_overrides=model_overrides,
    )
    cuda = torch.cuda.is_available() and not args.tiny
    est = estimate(v.train, v.model, device_kind="cuda" if cuda else "cpu")
    rows: list[dict] = []
    t1 = time.perf_counter()

    def on_row(
        row, plan
    ):  # each step also to stderr: a run killed by its timeout still shows its progress
        rows.append(dict(row))
        print(
            f"step {row.get('step')}/{args.steps} loss {row.get('loss')} tokens/s {row.get('tokens_per_sec')} "
            f"elapsed {row.get('elapsed_s')} s",
            file=sys.stderr,
            flush=True,
        )

    result = run_training(v.train, v.model, write_checkpoints=False, on_row=on_row)
    wall = time.perf_counter() - t1
    peak = result.peak_memory_bytes  # CPU: peak resident set size, what memory.total_cpu estimates
    if (
        cuda
    ):  # what memory.total_cuda estimates: the allocator's peak reservation + memory outside it
        free, total = torch.cuda.mem_get_info()
        peak = torch.cuda.max_memory_reserved() + max(
            0, total - free - torch.cuda.memory_reserved()
        )
    tps = steady_tokens_per_s(rows)
    mfus = [float(r["mfu"]) for r in rows if r.get("mfu") is not None]
    t = v.train.train
    doc = {
        "benchmark": "production_steps",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "tiny": args.tiny,
        "model": v.model.name,
        "precision": v.train.precision,
        "compile": v.train.optimization.compile,
        "compile_mode": v.train.optimization.compile_mode,
        "gradient_checkpointing": t.gradient_checkpointing,
        "micro_batch": t.micro_batch_size,
        "global_batch": t.global_batch_size,
        "seq_len": t.max_seq_length,
        "steps_requested": args.steps,
        "steps": result.steps,
        "stopped_by": result.stopped_by,
        "tokens": result.tokens,
        "data_and_tokenizer_s": round(prep_s, 2),
        "train_wall_s": round(wall, 2),
        "first_loss": next((float(r["loss"]) for r in rows if r.get("loss") is not None), None),
        "final_loss": result.final_loss,
        "steady_tokens_per_s": round(tps, 1) if tps else None,
        "mfu": round(mfus[-1], 4) if mfus else None,
        "peak_memory_bytes": peak,
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
