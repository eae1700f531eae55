"""Benchmark: training throughput of stock LitGPT vs this engine's model path, in one process.

Both sides get the same resolved config, the same initial weights, the same token batches
(uniform random ids, seeded), the same precision and micro-batch size. One measured step is one
micro-batch forward + backward (next-token cross-entropy, ``litgpt.utils.chunked_cross_entropy``
as the engine's ``lm_loss``) and one optimizer step (the config's optimizer, AdamW by default).

* ``stock``: ``litgpt.GPT`` as LitGPT builds it (``LLaMAMoE`` expert loop, attention repeating K/V),
  and, when the config compiles, ``torch.compile(model)`` with no arguments, as ``litgpt pretrain``.
* ``engine``: the engine's model construction (``worker.train.build_model`` with
  ``moe_implementation`` from the config, default ``grouped``), ``worker.gqa.use_gqa_attention``,
  the config's SDPA backend selection (``worker.attention``), and ``torch.compile`` with the
  config's mode/dynamic/fullgraph when ``optimization.compile`` is true.

Reported per micro-batch size: tokens/s, per-step time, MFU (CUDA only: active-parameter FLOPs per
token from ``service.estimate`` over the datasheet peak in ``worker.metrics``), peak memory (CUDA
only: ``torch.cuda.max_memory_allocated``; one process cannot separate two models' CPU memory),
the first step's loss of each side (a parity check: same weights, same batch), and
``ratio = engine tokens/s / stock tokens/s`` (on CPU also ``ratio_paired``, the median of the
per-step time ratios of the alternating sides).

On CPU the variants take turns step by step and the step time is process CPU time with one thread
by default (robust on a shared machine; ``--threads 0`` for torch's default, ``wall_*`` fields
hold wall time). On CUDA each variant runs alone (wall time, synchronised), compiled once for all
micro-batch sizes, so its peak memory is its own (with CUDA graphs, the graph pools of smaller
micro-batches measured before stay allocated). ``estimate`` is ``service.estimate``'s memory total
for the same config and micro-batch.

    uv run python bench/train_throughput.py                       # CPU: preset cpu-tiny
    uv run python bench/train_throughput.py --json
    python bench/train_throughput.py --micro-batch 4,max          # CUDA: configs/*.yaml (MoE-200M)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from importlib.metadata import version as _version  # noqa: E402

import torch  # noqa: E402

from service.config.merge import resolve  # noqa: E402
from service.estimate import estimate  # noqa: E402
from worker import train as engine  # noqa: E402
from worker.gqa import GQASelfAttention, use_gqa_attention  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--preset",
        default=None,
        help="default: cpu-tiny on CPU, none (the shipped MoE-200M config) on CUDA",
    )
    p.add_argument("--train-config", default=str(ROOT / "configs" / "train_config.yaml"))
    p.add_argument("--model-config", default=str(ROOT / "configs" / "model_config.yaml"))
    p.add_argument(
        "--micro-batch",
        default=None,
        help="comma-separated micro-batch sizes; 'max' = the largest power of two that fits the engine "
        "(CUDA; on a CPU: --max-micro-batch, for rehearsals). Default: the config's",
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="default: the config's train.max_seq_length"
    )
    p.add_argument("--precision", default=None, help="default: the config's")
    p.add_argument(
        "--compile",
        default="config",
        choices=["config", "on", "off"],
        help="engine: the config's optimization.compile (default), or forced on/off",
    )
    p.add_argument(
        "--stock-compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="stock: auto = as `litgpt pretrain` (torch.compile(model) whenever the engine compiles); "
        "off = eager (LitGPT's expert loop graph-breaks at every torch.where: ~100 graphs to compile)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="measured steps (default 10 CPU, 20 CUDA)"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="unmeasured first steps (default 2 CPU, 5 CUDA)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="CPU threads (default 1; 0 = torch's default)"
    )
    p.add_argument(
        "--max-micro-batch", type=int, default=512, help="upper bound of the 'max' search"
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="CPU: run the sides one after the other as on CUDA (default there) instead of alternating",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Side:
    """One model + optimizer + how to run a training step."""

    def __init__(
        self, name, raw, train_cfg, device, precision, compile_kwargs, attention_ctx, cudagraphs
    ):
        self.name = name
        self.raw = raw.to(device)
        if precision.endswith("-true") and precision != "32-true":
            self.raw = self.raw.to(
                torch.bfloat16 if precision.startswith("bf16") else torch.float16
            )
        self.model = (
            torch.compile(self.raw, **compile_kwargs) if compile_kwargs is not None else self.raw
        )
        self.optimizer = engine.build_optimizer(train_cfg, self.raw.parameters())
        self.device = device
        self.autocast = precision.endswith("-mixed")
        self.autocast_dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        self.attention_ctx = attention_ctx
        self.cudagraphs = cudagraphs
        self.wall, self.cpu, self.losses = [], [], []

    def step(self, batch: torch.Tensor, measure: bool) -> None:
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with (
            self.attention_ctx(),
            torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast),
        ):
            loss = engine.lm_loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)
        if measure:
            self.wall.append(time.perf_counter() - t0)
            self.cpu.append(time.process_time() - c0)
        self.losses.append(loss.detach().float())

    def release(self) -> None:
        del self.model, self.raw, self.optimizer
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def build_sides(
    v, device, precision, compile_mode, names=("stock", "engine"), stock_compile="auto"
) -> dict[str, Side]:
    t, opt = v.train, v.train.optimization
    plan_seq = v.train.train.max_seq_length or v.model.block_size
    torch.manual_seed(v.train.seed)
    stock_raw = engine.build_model(
        v.model,
        seq_len=plan_seq,
        moe_implementation="loop",
        gradient_checkpointing=t.train.gradient_checkpointing,
    )
    ours_raw = engine.build_model(
        v.model,
        seq_len=plan_seq,
        moe_implementation=opt.moe_implementation,
        gradient_checkpointing=t.train.gradient_checkpointing,
    )
    ours_raw.load_state_dict(stock_raw.state_dict())
    if not any(isinstance(m, GQASelfAttention) for m in ours_raw.modules()):
        use_gqa_attention(ours_raw)
    compile_on = opt.compile if compile_mode == "config" else compile_mode == "on"
    # as the engine: a host-sync MoE backend (pre-Hopper GPU, fp32) turns CUDA graphs off
    no_cudagraphs = engine.moe_backend_notes(
        ours_raw, device, engine.expert_dtype(precision, device.type), []
    )
    mode, _ = engine.effective_compile_mode(opt.compile_mode, device.type, no_cudagraphs)
    if compile_on:
        ours_compile = dict(mode=mode, dynamic=opt.compile_dynamic, fullgraph=opt.compile_fullgraph)
    else:
        ours_compile = None
    stock_on = compile_on if stock_compile == "auto" else stock_compile == "on"
    stock_kwargs: dict[str, Any] | None = {} if stock_on else None
    from worker.attention import choose_backends

    attention = choose_backends(
        flash_attention=opt.flash_attention,
        flash_attention_force=opt.flash_attention_force,
        disable_math_fallback=opt.disable_math_fallback,
        device_type=device.type,
    )
    cudagraphs = (
        compile_on and device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")
    )
    sides = {}
    if "stock" in names:
        sides["stock"] = Side(
            "stock", stock_raw, t, device, precision, stock_kwargs, nullcontext, False
        )
    if "engine" in names:
        sides["engine"] = Side(
            "engine", ours_raw, t, device, precision, ours_compile, attention.context, cudagraphs
        )
    return sides


def batches(vocab: int, mb: int, seq: int, n: int, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234 + mb)
    return [torch.randint(0, vocab, (mb, seq + 1), generator=g).to(device) for _ in range(n)]


def largest_micro_batch(v, device, precision, seq, start: int, limit: int) -> int | None:
    """Largest power-of-two micro-batch (from ``start`` up to ``limit``) at which the engine's model,
    run eagerly, completes two training steps without running out of CUDA memory. Eager needs at
    least the memory of the compiled model, so the result fits the compiled one too (CUDA graph
    pools aside)."""
    side = build_sides(v, device, precision, "off", names=("engine",))["engine"]
    best, mb = None, start
    try:
        while mb <= limit:
            try:
                for b in batches(v.model.vocab_size, mb, seq, 2, device):
                    side.step(b, measure=False)
            except torch.cuda.OutOfMemoryError:
                break
            best, mb = mb, mb * 2
            side.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    finally:
        side.release()
    return best


def run_side(
    name, v, device, precision, compile_mode, mbs, seq, warmup, steps, stock_compile="auto"
) -> dict:
    """Build one side once (one compilation; dynamic shapes serve every micro-batch size) and time
    it at each micro-batch size. Returns {mb: result dict or None (out of CUDA memory)}."""
    side = build_sides(
        v, device, precision, compile_mode, names=(name,), stock_compile=stock_compile
    )[name]
    out: dict[int, dict[str, Any] | None] = {}
    try:
        for mb in mbs:
            side.wall, side.cpu, side.losses = [], [], []
            gc.collect()
            cuda = device.type == "cuda"
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                for i, b in enumerate(batches(v.model.vocab_size, mb, seq, warmup + steps, device)):
                    side.step(b, measure=i >= warmup)
                out[mb] = dict(
                    wall=side.wall,
                    cpu=side.cpu,
                    loss=float(side.losses[0]),
                    peak=torch.cuda.max_memory_allocated(device) if cuda else None,
                )
            except torch.cuda.OutOfMemoryError:
                out[mb] = None
                side.optimizer.zero_grad(set_to_none=True)
    finally:
        side.release()
        torch._dynamo.reset()
    return out


def memory_estimate(v, mb: int) -> int | None:
    """``service.estimate``'s live tensors at the peak (``memory.tensors``, bytes) for the config at
    micro-batch ``mb``: comparable with ``max_memory_allocated`` (no CUDA context, no allocator slack;
    bench/memory_check.py compares the whole per-rank peak)."""
    try:
        t = v.train.model_dump(mode="json")
        t["train"]["micro_batch_size"] = mb
        t["train"]["global_batch_size"] = max(mb, t["train"].get("global_batch_size") or mb)
        from service.config.validate import validate_configs

        w = validate_configs(t, v.model.model_dump(mode="json"))
        return int(estimate(w.train, w.model).memory.tensors)
    except Exception:  # informational only
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    cuda = device.type == "cuda"
    if not cuda and args.threads:
        torch.set_num_threads(args.threads)
    preset = args.preset if args.preset is not None else (None if cuda else "cpu-tiny")
    overrides: dict = {"train": {}}
    if args.seq_len:
        overrides["train"]["max_seq_length"] = args.seq_len
    if args.precision:
        overrides["precision"] = args.precision
    v = resolve(
        args.train_config, args.model_config, preset=preset or None, train_overrides=overrides
    )
    precision = v.train.precision
    seq = v.train.train.max_seq_length or v.model.block_size
    steps = args.steps or (20 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)

    items = (args.micro_batch or str(v.train.train.micro_batch_size)).split(",")
    mbs = [int(item) for item in items if item.strip() != "max"]
    if any(item.strip() == "max" for item in items):
        if (
            not cuda and args.max_micro_batch > 64
        ):  # nothing runs out of memory there: the search ends at the bound
            raise SystemExit(
                "--micro-batch max on a CPU needs --max-micro-batch <= 64 (CPU memory is not searched; "
                "the bound is the result)"
            )
        fixed = mbs
        best = largest_micro_batch(
            v, device, precision, seq, start=min(fixed or [4]) * 2, limit=args.max_micro_batch
        )
        mbs = fixed + ([best] if best and best not in fixed else [])
        if not args.json:
            print(
                f"  largest micro-batch that fits (engine, eager): {best}",
                file=sys.stderr,
                flush=True,
            )

    flops_per_token = getattr(estimate(v.train, v.model), "flops_per_token", None)
    peak = None
    if cuda:
        from worker.metrics import peak_flops_per_device

        peak = peak_flops_per_device(torch.cuda.get_device_name(device), precision)

    per_mb: dict[int, dict] = {mb: {} for mb in mbs}
    if (
        cuda or args.sequential
    ):  # one side at a time, compiled once for all micro-batch sizes: own peak memory
        for name in ("engine", "stock"):
            for mb, r in run_side(
                name,
                v,
                device,
                precision,
                args.compile,
                mbs,
                seq,
                warmup,
                steps,
                args.stock_compile,
            ).items():
                per_mb[mb][name] = r
            if not args.json:
                print(f"  measured {name}", file=sys.stderr, flush=True)
    else:  # take turns step by step
        for mb in mbs:
            sides = build_sides(
                v, device, precision, args.compile, stock_compile=args.stock_compile
            )
            for i, b in enumerate(batches(v.model.vocab_size, mb, seq, warmup + steps, device)):
                for side in sides.values():
                    side.step(b, measure=i >= warmup)
            for name, side in sides.items():
                per_mb[mb][name] = dict(
                    wall=side.wall, cpu=side.cpu, loss=float(side.losses[0]), peak=None
                )
                side.release()
            if not args.json:
                print(f"  measured micro-batch {mb}", file=sys.stderr, flush=True)

    rows = []
    for mb in mbs:
        results = per_mb[mb]
        row: dict[str, Any] = {"micro_batch": mb, "seq_len": seq, "tokens_per_step": mb * seq}
        for name in ("stock", "engine"):
            r = results.get(name)
            if r is None:
                row.update(
                    {f"{name}_tokens_per_s": None, f"{name}_step_ms": None, f"{name}_oom": True}
                )
                continue
            step_s = statistics.median(r["wall"] if cuda else r["cpu"])  # noqa: E501
            tps = mb * seq / step_s
            row.update(
                {
                    f"{name}_tokens_per_s": round(tps, 1),
                    f"{name}_step_ms": round(step_s * 1e3, 3),
                    f"{name}_wall_step_ms": round(statistics.median(r["wall"]) * 1e3, 3),
                    f"{name}_mfu": (
                        round(tps * flops_per_token / peak, 4) if peak and flops_per_token else None
                    ),
                    f"{name}_peak_mem_bytes": r["peak"],
                    f"{name}_first_loss": round(r["loss"], 5),
                }
            )
        row["estimate_mem_bytes"] = memory_estimate(v, mb)
        s, e = row.get("stock_tokens_per_s"), row.get("engine_tokens_per_s")
        row["ratio"] = round(e / s, 3) if s and e else None
        if not cuda and not args.sequential and results.get("stock") and results.get("engine"):
            # the two sides ran alternately: the median of per-step ratios cancels slow drifts of a shared machine
            pairs = [
                a / b
                for a, b in zip(results["stock"]["cpu"], results["engine"]["cpu"], strict=True)
            ]
            row["ratio_paired"] = round(statistics.median(pairs), 3)
        rows.append(row)

    opt = v.train.optimization
    compile_on = opt.compile if args.compile == "config" else args.compile == "on"
    meta = {
        "benchmark": "train_throughput",
        "device": torch.cuda.get_device_name(device)
        if cuda
        else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "litgpt": _version("litgpt"),
        "preset": preset,
        "model": v.model.name,
        "precision": precision,
        "compile": (
            f"mode={opt.compile_mode} dynamic={opt.compile_dynamic} fullgraph={opt.compile_fullgraph}"
            if compile_on
            else "off"
        ),
        "stock_compile": (
            "torch.compile(model)"
            if (compile_on if args.stock_compile == "auto" else args.stock_compile == "on")
            else "off (eager)"
        ),
        "moe_implementation": opt.moe_implementation,
        "steps": steps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "metric": "wall-clock (CUDA-synchronised)"
        if cuda
        else "process CPU time (time.process_time)",
        "flops_per_token": flops_per_token,
        "peak_flops": peak,
    }
    if args.json:
        print(json.dumps({**meta, "rows": rows}, indent=1))
        return 0
    print(
        f"train throughput on {meta['device']} | torch {meta['torch']} | {meta['model']} | {precision} | "
        f"engine compile: {meta['compile']} | stock compile: {meta['stock_compile']} | MoE: {meta['moe_implementation']} | median of {steps} steps | "
        f"{meta['threads']} thread(s) | time = {meta['metric']}"
    )

    def fmt(x, spec="{:,.0f}"):
        return "-" if x is None else spec.format(x)

    print(
        "| micro-batch | seq | stock tok/s | engine tok/s | ratio (paired) | stock ms/step | engine ms/step | "
        "stock MFU | engine MFU | stock peak GiB | engine peak GiB | estimate GiB | first loss stock / engine |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        gib = lambda b: None if b is None else b / 2**30  # noqa: E731
        ratio = fmt(r["ratio"], "{:.2f}") + (
            f" ({r['ratio_paired']:.2f})" if r.get("ratio_paired") else ""
        )
        print(
            f"| {r['micro_batch']} | {r['seq_len']} | {fmt(r.get('stock_tokens_per_s'))} | "
            f"{fmt(r.get('engine_tokens_per_s'))} | {ratio} | "
            f"{fmt(r.get('stock_step_ms'), '{:.1f}')} | {fmt(r.get('engine_step_ms'), '{:.1f}')} | "
            f"{fmt(r.get('stock_mfu'), '{:.1%}')} | {fmt(r.get('engine_mfu'), '{:.1%}')} | "
            f"{fmt(gib(r.get('stock_peak_mem_bytes')), '{:.2f}')} | {fmt(gib(r.get('engine_peak_mem_bytes')), '{:.2f}')} | "
            f"{fmt(gib(r.get('estimate_mem_bytes')), '{:.2f}')} | "
            f"{fmt(r.get('stock_first_loss'), '{:.4f}')} / {fmt(r.get('engine_first_loss'), '{:.4f}')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
