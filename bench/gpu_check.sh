#!/usr/bin/env bash
# GPU check for a lent H100/H200 (the `device` tool), in one call, under 8 minutes, nothing downloaded.
#
# It runs on the machine's own python3 and PyTorch (no uv; 2.11 when last seen), with the
# pure-Python packages it lacks carried as wheels in .whl/ (ignored by git: `echo /.whl/ >>
# .git/info/exclude`). Fill .whl/ on the development machine from the repository root with
# (see /work/.library/device/README.md; versions = uv.lock's):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     litgpt==0.5.13 jsonargparse==4.41.0 docstring-parser==0.18.0 typeshed-client==2.15.0 \
#     lightning==2.6.6 lightning-utilities==0.15.3 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
#
# (about 5 MB; torch, tokenizers, numpy, pyyaml, safetensors, torchmetrics, fsspec, psutil, pytest
# and pytest-timeout are already on the machine). Then, with the device tool:
#
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Steps (each under its own `timeout`, so one that hangs cannot eat the others' time):
#   1. parity tests on the GPU: tests/test_moe.py, tests/test_moe_gqa.py (bf16 cases run on CUDA:
#      torch._grouped_mm's CUTLASS kernel, padded expert groups, flash SDPA with enable_gqa)
#   2. bench/moe_layer.py: one MoE-200M-sized layer, loop vs grouped, bf16-mixed
#   2b. the same layer with each expert backend forced (grouped_mm, grouped_mm_sync = the path of
#      pre-Hopper GPUs and fp32, dense), bf16-mixed and 32-true (GPU_CHECK_BACKENDS to choose)
#   3. bench/train_throughput.py: MoE-200M, seq 512, bf16-mixed, micro-batch 4 and the largest that
#      fits; stock LitGPT eager vs the engine compiled as configured (reduce-overhead, dynamic)
#   4. bench/smoke_check.py: the spec's smoke test through the engine, time and peak memory vs estimate
#   5. bench/memory_check.py: the memory estimate (memory.total_cuda) vs the measured per-rank peak
#      (max_memory_reserved + the CUDA context) of a few real steps of the shipped config and cpu-tiny,
#      each in its own process (the CPU table is in bench/RESULTS.md)
#   6. a markdown summary of everything (also in $OUT/gpu_check.md, the JSON files beside it)
#
# Rehearsal on the development CPU with small settings:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_NO_WHEELS=1 PYTHON="uv run python" OUT=/tmp/gc bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEV=${GPU_CHECK_DEVICE:-cuda}
RES=${OUT:-/tmp/gpu_check}
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }

if [ -z "${GPU_CHECK_NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/ wheels: using the installed packages"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

stamp "environment"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true) | tee "$RES/gpu.txt"
$PY - <<'EOF' | tee "$RES/versions.txt"
import importlib.metadata as md, platform, torch
names = ["torch", "litgpt", "lightning", "pydantic", "tokenizers", "triton"]
vers = {}
for n in names:
    try:
        vers[n] = md.version(n)
    except md.PackageNotFoundError:
        vers[n] = "-"
print("python", platform.python_version(), "|", " | ".join(f"{k} {v}" for k, v in vers.items()),
      "| cuda", torch.version.cuda, "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF

if [ "$DEV" = cuda ]; then
  LAYER_ARGS="--device cuda"
  TRAIN_ARGS="--device cuda --micro-batch 4,max --max-micro-batch 256 --steps 12 --warmup 4 --stock-compile off"
  SMOKE_ARGS=""
  MEM_ARGS="--device cuda --only default,cpu-tiny --steps 3 --timeout 100"
  KARGS=()
else  # rehearsal on a CPU: small and quick
  LAYER_ARGS="--device cpu --tokens 256,1024 --iters 2 --warmup 1"
  TRAIN_ARGS="--device cpu --steps 2 --warmup 1"
  SMOKE_ARGS="--preset cpu-tiny"
  MEM_ARGS="--device cpu --only cpu-tiny --steps 2"
  KARGS=(-k "grouped_mm_matches or whole_model")
fi

stamp "1/5 parity tests"
timeout 90 $PY -m pytest -q --maxfail=5 -p no:cacheprovider -m "not slow" ${KARGS[@]+"${KARGS[@]}"} \
  tests/test_moe.py tests/test_moe_gqa.py >"$RES/parity.log" 2>&1
echo "rc=$?" >>"$RES/parity.log"
tail -n 4 "$RES/parity.log"

stamp "2/5 MoE layer benchmark"
timeout 45 $PY bench/moe_layer.py $LAYER_ARGS --json >"$RES/moe_layer.json" 2>"$RES/moe_layer.err" \
  || { echo "moe_layer failed or timed out"; tail -n 5 "$RES/moe_layer.err"; }

# 2b (MoE backends, its own step): each expert backend forced, so the pre-Hopper/fp32 path
# (grouped_mm_sync) is measured on any GPU; GPU_CHECK_BACKENDS="" skips it.
BACKENDS=${GPU_CHECK_BACKENDS-grouped_mm,grouped_mm_sync,dense}
if [ -n "$BACKENDS" ]; then
  stamp "2b/5 MoE layer per forced backend ($BACKENDS)"
  if [ "$DEV" = cuda ]; then BK_ARGS="--device cuda --tokens 4096,16384 --iters 10"; BK_PRECS="bf16-mixed 32-true"
  else BK_ARGS="--device cpu --tokens 256 --iters 1 --warmup 0"; BK_PRECS="32-true"; fi
  for prec in $BK_PRECS; do
    timeout 60 $PY bench/moe_layer.py $BK_ARGS --precision $prec --backend "$BACKENDS" --json \
      >"$RES/moe_backends_$prec.json" 2>"$RES/moe_backends_$prec.err" \
      || { echo "moe_layer --backend ($prec) failed or timed out"; tail -n 5 "$RES/moe_backends_$prec.err"; }
  done
fi

stamp "3/5 training throughput"
timeout 200 $PY bench/train_throughput.py $TRAIN_ARGS --json >"$RES/train_throughput.json" 2>"$RES/train_throughput.err" \
  || { echo "train_throughput failed or timed out"; tail -n 8 "$RES/train_throughput.err"; }

stamp "4/5 smoke test"
timeout 80 $PY bench/smoke_check.py $SMOKE_ARGS --json --workdir /tmp/moejobs-smoke >"$RES/smoke.json" 2>"$RES/smoke.err" \
  || { echo "smoke test failed or timed out"; tail -n 8 "$RES/smoke.err"; }

stamp "5/5 memory estimate vs measured"
timeout 130 $PY bench/memory_check.py $MEM_ARGS --workdir /tmp/moejobs-memcheck --out "$RES/memory_check.json" \
  >"$RES/memory_check.txt" 2>"$RES/memory_check.err" \
  || { echo "memory check failed or timed out"; tail -n 8 "$RES/memory_check.err"; }

stamp "summary"
$PY - "$RES" <<'EOF' | tee "$RES/gpu_check.md"
import json, re, sys
from pathlib import Path
res = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((res / name).read_text())
    except Exception as exc:  # a step that failed or timed out
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"
num = lambda x, f="{:,.0f}": "-" if x is None else f.format(x)
print("## GPU check\n")
print("- GPU:", (res / "gpu.txt").read_text().strip() if (res / "gpu.txt").exists() else "?")
print("- versions:", (res / "versions.txt").read_text().strip() if (res / "versions.txt").exists() else "?")
log = (res / "parity.log").read_text() if (res / "parity.log").exists() else ""
summary = [l for l in log.splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
print("- parity tests:", summary[-1].strip("= ") if summary else "no result (see parity.log)")
layer = load("moe_layer.json")
print("\n### MoE layer, forward+backward (loop = LitGPT LLaMAMoE, grouped = worker.moe.GroupedMoE)\n")
if "rows" in layer:
    print(f"{layer['precision']}, n_embd {layer['n_embd']}, {layer['n_expert']} experts x {layer['moe_intermediate_size']}, "
          f"top-{layer['top_k']}, {layer['metric']}\n")
    print("| tokens | loop ms | grouped ms | ratio | backend |\n|---:|---:|---:|---:|---|")
    for r in layer["rows"]:
        print(f"| {r['tokens']} | {r['loop_ms']:.2f} | {r['grouped_ms']:.2f} | {r['ratio']:.2f} | {r['backend']} |")
else:
    print(layer.get("error"))
tt = load("train_throughput.json")
print("\n### Training throughput (stock LitGPT vs engine)\n")
if "rows" in tt:
    print(f"{tt['model']}, {tt['precision']}, compile: {tt['compile']}, stock compile: {tt.get('stock_compile')}, "
          f"median of {tt['steps']} steps\n")
    print("| micro-batch | seq | stock tok/s | engine tok/s | ratio | stock MFU | engine MFU | stock peak GiB | engine peak GiB | estimate GiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in tt["rows"]:
        print(f"| {r['micro_batch']} | {r['seq_len']} | {num(r.get('stock_tokens_per_s'))} | {num(r.get('engine_tokens_per_s'))} | "
              f"{num(r.get('ratio'), '{:.2f}')} | {num(r.get('stock_mfu'), '{:.1%}')} | {num(r.get('engine_mfu'), '{:.1%}')} | "
              f"{gib(r.get('stock_peak_mem_bytes'))} | {gib(r.get('engine_peak_mem_bytes'))} | {gib(r.get('estimate_mem_bytes'))} |")
    best = max((r for r in tt["rows"] if r.get("engine_tokens_per_s")), key=lambda r: r["engine_tokens_per_s"], default=None)
    if best:
        print(f"\nTargets: engine {best['engine_tokens_per_s']:,.0f} tok/s at micro-batch {best['micro_batch']} "
              f"(target >= 300,000), ratio {num(best.get('ratio'), '{:.2f}')} (target >= 2.5)")
else:
    print(tt.get("error"))
sm = load("smoke.json")
print("\n### Smoke test (spec overrides, through worker.train.run_training)\n")
if "train_wall_s" in sm:
    print(f"| model | precision | compile | wall s (incl. compile) | peak GiB | estimate GiB | peak/estimate |\n|---|---|---|---:|---:|---:|---:|")
    print(f"| {sm['model']} | {sm['precision']} | {sm['compile']} | {sm['train_wall_s']} | {gib(sm['peak_memory_bytes'])} | "
          f"{gib(sm['estimate_memory_bytes'])} | {sm['peak_over_estimate']} |")
else:
    print(sm.get("error"))
mc = load("memory_check.json")
print("\n### Memory estimate vs measured peak per rank (bench/memory_check.py)\n")
if "rows" in mc:
    print(f"device {mc['device']} {mc.get('gpu', '')}; " + (
        "measured = max_memory_reserved + memory outside the allocator (CUDA context); estimate = memory.total_cuda\n"
        if mc["device"] == "cuda" else "measured = peak resident set size; estimate = memory.total_cpu\n"))
    print("| config | precision | compile | micro-batch x seq | estimate GiB | measured GiB | estimate/measured | "
          "max allocated GiB | tensors estimate GiB | outside allocator GiB | step s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in mc["rows"]:
        e = r.get("estimate") or {}
        print(f"| {r['config']} | {r['precision']} | {r['compile']} | {r['micro_batch']} x {r['seq_len']} | "
              f"{gib(r.get('estimate_bytes'))} | {gib(r.get('measured_bytes'))} | {r.get('ratio', '-')} | "
              f"{gib(r.get('cuda_max_allocated'))} | {gib(e.get('tensors'))} | {gib(r.get('cuda_outside_allocator'))} | "
              f"{r.get('step_s') or '-'} |" + (f" error: {r['error']}" if r.get("error") else ""))
else:
    print(mc.get("error"))
EOF
if [ -n "$BACKENDS" ]; then  # summary of step 2b, appended
$PY - "$RES" "$BK_PRECS" <<'EOF' | tee -a "$RES/gpu_check.md"
import json, sys
from pathlib import Path
res = Path(sys.argv[1])
print("\n### MoE layer per forced backend (bench/moe_layer.py --backend; loop = LitGPT LLaMAMoE)\n")
print("| precision | backend | tokens | loop ms | backend ms | ratio loop/backend |\n|---|---|---:|---:|---:|---:|")
for prec in sys.argv[2].split():
    try:
        doc = json.loads((res / f"moe_backends_{prec}.json").read_text())
    except Exception as exc:
        print(f"| {prec} | - | - | - | - | {type(exc).__name__} (see moe_backends_{prec}.err) |")
        continue
    for r in doc["rows"]:
        if "error" in r:
            print(f"| {prec} | {r['backend']} | {r['tokens']} | - | - | error: {r['error'][:120]} |")
        else:
            print(f"| {prec} | {r['backend']} | {r['tokens']} | {r['loop_ms']:.2f} | {r['grouped_ms']:.2f} | {r['ratio']:.2f} |")
EOF
fi
stamp "done"
