"""Benchmark: one MoE layer alone, forward + backward, LitGPT's loop vs worker.moe.GroupedMoE.

For each token count N it times ``y = layer(x); y.backward(g)`` (``g`` a fixed random upstream
gradient) for

* ``loop``: stock ``litgpt.model.LLaMAMoE`` (Python loop over experts, one host sync each),
* ``grouped``: :class:`worker.moe.GroupedMoE` as the engine uses it (expert weights stacked from
  LitGPT's per-expert modules inside every forward),
* ``prestacked``: the same computation with the weights already stacked as leaf parameters: the
  difference to ``grouped`` is what keeping LitGPT's per-expert modules (and state-dict keys)
  costs (``stack_share``).

All three share the weights and the input. Times are medians over ``--iters`` iterations after
``--warmup``, the variants taking turns within each iteration. On CUDA ``*_ms`` is wall-clock time
(synchronised before and after); on CPU it is the process CPU time with one thread by default (the
wall time of an idle machine, unaffected by other jobs on a shared one; ``*_wall_ms`` has the wall
time too). ``ratio = loop_ms / grouped_ms`` (> 1: grouped is faster); ``ratio_paired`` is the
median of the per-iteration ratios (the two ran back to back), robust to drifts of a shared machine.

``--backend`` forces the expert backend of ``grouped``/``prestacked`` (``auto`` = what the engine
picks on this device, see ``worker.moe.select_backend``); a comma-separated list measures each in
turn (one row per backend and token count), so a Hopper GPU can also measure the pre-Hopper
``grouped_mm_sync`` path and ``dense``. A backend that fails records ``error`` in its rows.

Defaults: on CPU the ``cpu-tiny`` widths (n_embd 128, 4 experts of 256, top-2) in fp32 (that preset
trains in 32-true); on CUDA the MoE-200M widths (768, 8 experts of 2048, top-2) in bf16-mixed.

    uv run python bench/moe_layer.py                  # table
    uv run python bench/moe_layer.py --json           # one JSON document
    uv run python bench/moe_layer.py --device cuda --tokens 2048,8192,32768 --compile
    uv run python bench/moe_layer.py --backend grouped_mm,grouped_mm_sync,dense --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from importlib.metadata import version as _version  # noqa: E402

import litgpt  # noqa: E402
import torch  # noqa: E402
from litgpt.model import LLaMAMoE  # noqa: E402

from worker.moe import _BACKENDS, GroupedMoE  # noqa: E402


class PrestackedMoE(GroupedMoE):
    """GroupedMoE whose stacked expert weights are leaf parameters (measures the stacking cost)."""

    def prestack(self) -> None:
        stacked = GroupedMoE._stacked(self, self.experts[0].fc_1.weight.dtype)[:3]
        self._stacked_params = torch.nn.ParameterList([w.detach().clone() for w in stacked])

    def _stacked(self, dtype):
        return (*(w.to(dtype) for w in self._stacked_params), None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (B*T)")
    p.add_argument("--n-embd", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None, help="moe_intermediate_size")
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--precision", default=None, help="32-true | bf16-mixed | bf16-true")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile each layer (default mode)")
    p.add_argument(
        "--backend",
        default="auto",
        help=f"GroupedMoE backend(s), comma-separated, each one of {', '.join(_BACKENDS)} (default auto)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads on CPU (default 1: stable on a shared machine; 0 = torch's default)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layers(layers: dict, x, grad, device, precision, iters, warmup) -> dict[str, Any]:
    """Median wall and process-CPU milliseconds of one forward + backward per layer.

    The layers take turns within each iteration, so a slow phase of a shared machine hits all of
    them alike. On CPU the process CPU time (``time.process_time``) is the robust figure: with one
    thread it equals the wall time of an idle machine and ignores time the process waits for a core.
    """
    autocast = precision == "bf16-mixed"
    wall: dict[str, list[float]] = {k: [] for k in layers}
    cpu: dict[str, list[float]] = {k: [] for k in layers}
    for i in range(warmup + iters):
        for name, layer in layers.items():
            layer.zero_grad(set_to_none=True)
            xi = x.detach().requires_grad_(True)
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                y = layer(xi)
            y.backward(grad.to(y.dtype))
            _sync(device)
            if i >= warmup:
                wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
    out: dict[str, Any] = {
        k: {"wall": statistics.median(wall[k]), "cpu": statistics.median(cpu[k])} for k in layers
    }
    times = wall if device.type == "cuda" else cpu
    out["paired_ratio"] = statistics.median(
        a / b for a, b in zip(times["loop"], times["grouped"], strict=True)
    )
    return out


def measure(layers, grouped, n, n_embd, device, param_dtype, precision, iters, warmup) -> dict:
    """One row: ``layers`` timed on ``n`` tokens (an ``error`` row when the backend fails)."""
    cuda = device.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(n)
    x = torch.randn(1, n, n_embd, generator=g).to(device, param_dtype)
    grad = torch.randn(1, n, n_embd, generator=g).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        backend = grouped.resolved_backend(x)
    try:
        t = time_layers(layers, x, grad, device, precision, iters, warmup)
    except Exception as exc:  # e.g. a forced backend this PyTorch/GPU cannot run
        return {"tokens": n, "backend": backend, "error": f"{type(exc).__name__}: {exc}"[:300]}
    metric = "wall" if cuda else "cpu"
    ms = {k: t[k][metric] for k in layers}
    return {
        "tokens": n,
        "loop_ms": round(ms["loop"], 3),
        "grouped_ms": round(ms["grouped"], 3),
        "prestacked_ms": round(ms["prestacked"], 3),
        "ratio": round(ms["loop"] / ms["grouped"], 3),
        "ratio_paired": round(t["paired_ratio"], 3),
        "stack_share": round(max(0.0, ms["grouped"] - ms["prestacked"]) / ms["grouped"], 3),
        "loop_wall_ms": round(t["loop"]["wall"], 3),
        "grouped_wall_ms": round(t["grouped"]["wall"], 3),
        "backend": backend,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads and not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    cuda = device.type == "cuda"
    n_embd = args.n_embd or (768 if cuda else 128)
    inter = args.intermediate or (2048 if cuda else 256)
    experts = args.experts or (8 if cuda else 4)
    precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    iters = args.iters or (20 if cuda else 5)
    default_tokens = "2048,4096,8192,16384,32768" if cuda else "256,512,1024,2048,4096,8192"
    tokens = [int(t) for t in (args.tokens or default_tokens).split(",")]
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    bad = [b for b in backends if b not in _BACKENDS]
    if bad or not backends:
        print(
            f"--backend: {', '.join(bad) or 'empty'} is not one of {', '.join(_BACKENDS)}",
            file=sys.stderr,
        )
        return 2
    param_dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32

    config = litgpt.Config(
        n_embd=n_embd,
        n_head=max(1, n_embd // 64),
        n_layer=1,
        padded_vocab_size=64,
        vocab_size=64,
        mlp_class_name="LLaMAMoE",
        n_expert=experts,
        n_expert_per_token=args.top_k,
        moe_intermediate_size=inter,
        bias=False,
    )
    torch.manual_seed(0)
    loop = LLaMAMoE(config).to(device, param_dtype)
    grouped = GroupedMoE(config).to(device, param_dtype)
    grouped.load_state_dict(loop.state_dict())
    pre = PrestackedMoE(config).to(device, param_dtype)
    pre.load_state_dict(loop.state_dict())
    pre.prestack()
    rows = []
    for backend_arg in backends:
        grouped.backend = pre.backend = backend_arg
        layers = {"loop": loop, "grouped": grouped, "prestacked": pre}
        if args.compile:
            torch._dynamo.reset()
            layers = {k: torch.compile(v) for k, v in layers.items()}
        for n in tokens:
            rows.append(
                measure(
                    layers, grouped, n, n_embd, device, param_dtype, precision, iters, args.warmup
                )
            )
            rows[-1]["forced"] = backend_arg != "auto"
            if not args.json:
                print(f"  measured {n} tokens ({rows[-1]['backend']})", file=sys.stderr, flush=True)

    meta = {
        "benchmark": "moe_layer",
        "device": torch.cuda.get_device_name(device)
        if cuda
        else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "litgpt": _version("litgpt"),
        "precision": precision,
        "compile": args.compile,
        "backends": backends,
        "n_embd": n_embd,
        "moe_intermediate_size": inter,
        "n_expert": experts,
        "top_k": args.top_k,
        "iters": iters,
        "warmup": args.warmup,
        "metric": "wall-clock ms (CUDA-synchronised)"
        if cuda
        else "process CPU ms (time.process_time)",
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps({**meta, "rows": rows}, indent=1))
    else:
        print(
            f"MoE layer fwd+bwd on {meta['device']} | torch {meta['torch']} | {precision} | "
            f"n_embd {n_embd}, {experts} experts x {inter}, top-{args.top_k} | compile {args.compile} | "
            f"median of {iters} | {torch.get_num_threads()} thread(s) | ms = {meta['metric']}"
        )
        print(
            "| tokens | loop ms | grouped ms | ratio loop/grouped (paired) | prestacked ms | stack share | backend |"
        )
        print("|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['tokens']} | - | - | - | - | - | {r['backend']}: {r['error']} |")
                continue
            print(
                f"| {r['tokens']} | {r['loop_ms']:.2f} | {r['grouped_ms']:.2f} | {r['ratio']:.2f} ({r['ratio_paired']:.2f}) | "
                f"{r['prestacked_ms']:.2f} | {r['stack_share']:.0%} | {r['backend']} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
