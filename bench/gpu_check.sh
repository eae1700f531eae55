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
# Steps (each under its own `timeout`, capped by what is left of the time budget, GPU_CHECK_BUDGET
# seconds: 450 on a GPU, so one that hangs cannot eat the others' time and the summary always prints):
#   1. parity tests on the GPU: tests/worker/moe/test_moe.py, tests/worker/moe/test_gqa.py (bf16
#      cases run on CUDA: torch._grouped_mm's CUTLASS kernel, padded expert groups, flash SDPA
#      with enable_gqa)
#   2. bench/moe_layer.py: one MoE-200M-sized layer, loop vs grouped, bf16-mixed
#   2b. moe_backends_<precision>: the same layer with each expert backend forced (grouped_mm,
#      grouped_mm_sync = the path of pre-Hopper GPUs and fp32, dense), bf16-mixed and 32-true on a
#      GPU, 32-true in the rehearsal (GPU_CHECK_BACKENDS to choose, empty to skip)
#   3. bench/train_throughput.py: MoE-200M, seq 512, bf16-mixed, micro-batch 4 and the largest that
#      fits; stock LitGPT eager vs the engine compiled as configured (reduce-overhead, dynamic), MFU
#      against the datasheet peak (worker.metrics)
#   4. bench/smoke_check.py: the spec's smoke test through the engine, time and peak memory vs estimate
#   5. bench/production_steps.py: the production preset's first 50 optimizer steps (max-autotune,
#      gradient checkpointing, global batch 256), loss, tokens/s, MFU, peak memory vs estimate
#   6. bench/memory_check.py: the memory estimate (memory.total_cuda) vs the measured per-rank peak
#      (max_memory_reserved + the CUDA context) of a few real steps of the shipped config and cpu-tiny,
#      each in its own process (the CPU table is in bench/RESULTS.md)
#   7. only when at least 170 s are left: stock LitGPT compiled (--stock-compile on) vs the engine at
#      micro-batch 4
#   then a markdown summary of everything (also in $OUT/gpu_check.md, the JSON files beside it, and
#   steps.tsv: step, exit status (124 = timed out, "skipped" = no time left), seconds). The script
#   exits 1 when a step failed.
#
# Adding a step is one block: `step NAME TIMEOUT STDOUT_FILE command...` (and its section in the
# summary). Rehearsal modes on a CPU (no wheels needed):
#   GPU_CHECK_REHEARSAL=1 PYTHON="uv run python" OUT=/tmp/gc bash bench/gpu_check.sh
#     tiny sizes, the same steps and output, two steps at a time, one thread each: about 105 s of
#     CPU time (mostly torch + litgpt imports), 140 s wall on 2 cores shared with other jobs (load 4);
#     tests/bench/test_gpu_check.py runs it in CI, so a change that breaks a step fails the test suite.
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_NO_WHEELS=1 PYTHON="uv run python" OUT=/tmp/gc bash bench/gpu_check.sh
#     the older, larger CPU settings (a few minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REHEARSAL=${GPU_CHECK_REHEARSAL:-}
if [ -n "$REHEARSAL" ]; then
  DEV=cpu
  GPU_CHECK_NO_WHEELS=1
  # One thread per process: with two threads per process on a shared 2-core machine, every
  # parallel region waits for a descheduled thread (a tiny training step went from 0.2 s to 13 s).
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
else
  DEV=${GPU_CHECK_DEVICE:-cuda}
fi
JOBS=${GPU_CHECK_JOBS:-1}
SCALE=1  # rehearsal: each step's cap x4, for a loaded CPU (only the overall budget bounds it)
if [ -n "$REHEARSAL" ]; then BUDGET=${GPU_CHECK_BUDGET:-600}; JOBS=${GPU_CHECK_JOBS:-2}; SCALE=4
elif [ "$DEV" = cuda ]; then BUDGET=${GPU_CHECK_BUDGET:-450}
else BUDGET=${GPU_CHECK_BUDGET:-600}; fi
RES=${OUT:-/tmp/gpu_check}
WORK=${GPU_CHECK_WORKDIR:-/tmp/moejobs-gpucheck}
mkdir -p "$RES" "$WORK"
: >"$RES/steps.tsv"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
# budget CAP: seconds a step may take: CAP (x SCALE), or less when the budget (minus 20 s for the summary) is short.
budget() {
  local left=$(( T0 + BUDGET - 20 - $(date +%s) )) cap=$(( $1 * SCALE ))
  echo $(( left < cap ? left : cap ))
}
# step NAME TIMEOUT STDOUT_FILE command...: run under `timeout` (stdout to $RES/STDOUT_FILE, stderr to
# $RES/NAME.err), record "NAME rc seconds" in steps.tsv, print the error's tail when it fails. With
# JOBS > 1 (rehearsal only: steps share no files) up to JOBS steps run at once.
run_step() {
  local name=$1 limit=$2 out=$3 rc s
  shift 3
  stamp "$name (at most ${limit}s)"
  s=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$RES/$out" 2>"$RES/$name.err"
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - s ))" >>"$RES/steps.tsv"
  if [ "$rc" -ne 0 ]; then
    echo "$name failed (exit $rc; 124 = timed out)"
    tail -n 8 "$RES/$name.err"
  fi
}
step() {
  if [ "$2" -lt 10 ]; then
    stamp "$1: skipped, no time left"
    printf '%s\tskipped\t0\n' "$1" >>"$RES/steps.tsv"
  elif [ "$JOBS" -gt 1 ]; then
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    run_step "$@" &
  else
    run_step "$@"
  fi
}

if [ -z "${GPU_CHECK_NO_WHEELS:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/ wheels: using the installed packages"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

stamp "environment"
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi") \
  | tee "$RES/gpu.txt"
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
  COMPILED_ARGS="--device cuda --micro-batch 4 --steps 12 --warmup 4 --stock-compile on"
  SMOKE_ARGS=""
  PROD_ARGS="--steps 50"
  MEM_ARGS="--device cuda --only default,cpu-tiny --steps 3 --timeout 100"
  KARGS=()
elif [ -n "$REHEARSAL" ]; then  # tiny: every step's code path, ~105 s of CPU; the figures mean nothing
  LAYER_ARGS="--device cpu --tokens 64 --n-embd 64 --intermediate 128 --experts 4 --iters 1 --warmup 0"
  TRAIN_ARGS="--device cpu --micro-batch 2,max --max-micro-batch 4 --seq-len 32 --steps 1 --warmup 1 --stock-compile off"
  COMPILED_ARGS="--device cpu --micro-batch 2 --seq-len 32 --steps 1 --warmup 1 --compile off --stock-compile off"
  SMOKE_ARGS="--preset cpu-tiny"
  PROD_ARGS="--tiny --steps 10"
  MEM_ARGS="--device cpu --only cpu-tiny --steps 1"
  KARGS=(-k "grouped_mm_matches or whole_model")
else  # the older CPU settings: small and quick
  LAYER_ARGS="--device cpu --tokens 256,1024 --iters 2 --warmup 1"
  TRAIN_ARGS="--device cpu --steps 2 --warmup 1"
  COMPILED_ARGS="--device cpu --steps 2 --warmup 1 --compile off --stock-compile off"
  SMOKE_ARGS="--preset cpu-tiny"
  PROD_ARGS="--tiny --steps 50"
  MEM_ARGS="--device cpu --only cpu-tiny --steps 2"
  KARGS=(-k "grouped_mm_matches or whole_model")
fi

step parity "$(budget 90)" parity.log \
  $PY -m pytest -q --maxfail=5 -p no:cacheprovider -m "not slow" ${KARGS[@]+"${KARGS[@]}"} \
  tests/worker/moe/test_moe.py tests/worker/moe/test_gqa.py

step moe_layer "$(budget 45)" moe_layer.json $PY bench/moe_layer.py $LAYER_ARGS --json

# MoE backends, each forced (one step per precision), so the pre-Hopper/fp32 path
# (grouped_mm_sync) is measured on any GPU; GPU_CHECK_BACKENDS="" skips them.
BACKENDS=${GPU_CHECK_BACKENDS-grouped_mm,grouped_mm_sync,dense}
if [ -n "$BACKENDS" ]; then
  if [ "$DEV" = cuda ]; then BK_ARGS="--device cuda --tokens 4096,16384 --iters 10"; BK_PRECS="bf16-mixed 32-true"
  else BK_ARGS="$LAYER_ARGS"; BK_PRECS="32-true"; fi
  for prec in $BK_PRECS; do
    step "moe_backends_$prec" "$(budget 60)" "moe_backends_$prec.json" \
      $PY bench/moe_layer.py $BK_ARGS --precision "$prec" --backend "$BACKENDS" --json
  done
fi

step train_throughput "$(budget 200)" train_throughput.json $PY bench/train_throughput.py $TRAIN_ARGS --json

step smoke "$(budget 80)" smoke.json $PY bench/smoke_check.py $SMOKE_ARGS --json --workdir "$WORK/smoke"

# max_time stops training at a step boundary with the steps done so far reported, before the timeout
# (which leaves 45 s for start-up and data preparation).
t=$(budget 150)
step production "$t" production.json \
  $PY bench/production_steps.py $PROD_ARGS --max-time $(( t > 65 ? t - 45 : 20 )) --json --workdir "$WORK/production"

step memory_check "$(budget 130)" memory_check.txt \
  $PY bench/memory_check.py $MEM_ARGS --workdir "$WORK/memcheck" --out "$RES/memory_check.json"

# Optional: stock LitGPT compiled only when enough time is left (compiling its expert loop is slow).
t=$(budget 170)
if [ "$t" -ge 170 ]; then
  step train_throughput_compiled "$t" train_throughput_compiled.json \
    $PY bench/train_throughput.py $COMPILED_ARGS --json
else
  stamp "train_throughput_compiled: not run (${t}s left, needs 170s)"
  printf '%s\tnot run\t0\n' train_throughput_compiled >>"$RES/steps.tsv"
fi

wait
stamp "summary"
$PY - "$RES" <<'EOF' | tee "$RES/gpu_check.md"
import json, re, sys
from pathlib import Path
res = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((res / name).read_text())
    except Exception as exc:  # a step that failed or timed out: its stderr's last lines say why
        err = res / (name.rsplit(".", 1)[0] + ".err")
        tail = [l for l in err.read_text(errors="replace").splitlines() if l.strip()][-3:] if err.exists() else []
        return {"error": f"{type(exc).__name__}: {exc}"[:200] + "".join(f"\n    {l[:300]}" for l in tail)}
gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"
num = lambda x, f="{:,.0f}": "-" if x is None else f.format(x)
print("## GPU check\n")
print("- GPU:", (res / "gpu.txt").read_text().strip() if (res / "gpu.txt").exists() else "?")
print("- versions:", (res / "versions.txt").read_text().strip() if (res / "versions.txt").exists() else "?")
steps = [l.split("\t") for l in (res / "steps.tsv").read_text().splitlines()] if (res / "steps.tsv").exists() else []
print("\n| step | exit status | s |\n|---|---|---:|")
for row in steps:
    print("| " + " | ".join(row) + " |")
print()
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
def throughput(name, title):
    tt = load(name)
    print(f"\n### {title}\n")
    if "rows" not in tt:
        print(tt.get("error"))
        return
    print(f"{tt['model']}, {tt['precision']}, compile: {tt['compile']}, stock compile: {tt.get('stock_compile')}, "
          f"median of {tt['steps']} steps; MFU against the datasheet peak {num(tt.get('peak_flops'), '{:.3g}')} FLOP/s\n")
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
throughput("train_throughput.json", "Training throughput (stock LitGPT eager vs engine)")
sm = load("smoke.json")
print("\n### Smoke test (spec overrides, through worker.train.run_training)\n")
if "train_wall_s" in sm:
    print(f"| model | precision | compile | wall s (incl. compile) | peak GiB | estimate GiB | peak/estimate |\n|---|---|---|---:|---:|---:|---:|")
    print(f"| {sm['model']} | {sm['precision']} | {sm['compile']} | {sm['train_wall_s']} | {gib(sm['peak_memory_bytes'])} | "
          f"{gib(sm['estimate_memory_bytes'])} | {sm['peak_over_estimate']} |")
else:
    print(sm.get("error"))
pr = load("production.json")
print("\n### Production preset, first optimizer steps (bench/production_steps.py)\n")
if "steps" in pr:
    print("| model | precision | compile | micro x global batch x seq | steps | stopped by | wall s (incl. compile) | "
          "loss first -> last | steady tok/s | MFU | peak GiB | estimate GiB | peak/estimate |")
    print("|---|---|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|")
    print(f"| {pr['model']}{' (tiny)' if pr.get('tiny') else ''} | {pr['precision']} | "
          f"{pr['compile_mode'] if pr['compile'] else 'off'} | {pr['micro_batch']} x {pr['global_batch']} x {pr['seq_len']} | "
          f"{pr['steps']}/{pr['steps_requested']} | {pr['stopped_by']} | {pr['train_wall_s']} | "
          f"{num(pr.get('first_loss'), '{:.2f}')} -> {num(pr.get('final_loss'), '{:.2f}')} | {num(pr.get('steady_tokens_per_s'))} | "
          f"{num(pr.get('mfu'), '{:.1%}')} | {gib(pr.get('peak_memory_bytes'))} | {gib(pr.get('estimate_memory_bytes'))} | "
          f"{pr.get('peak_over_estimate', '-')} |")
else:
    print(pr.get("error"))
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
if (res / "train_throughput_compiled.json").exists() or any(r[0] == "train_throughput_compiled" for r in steps):
    throughput("train_throughput_compiled.json", "Training throughput (stock LitGPT compiled vs engine, when time allowed)")
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
# exit 1 when a step failed, timed out or was skipped ("not run" is the optional step's choice)
! awk -F'\t' '$2 != "0" && $2 != "not run" {bad = 1} END {exit !bad}' "$RES/steps.tsv"
