"""Admission: whether a validated run may be queued, compared with what no machine could run
and with what the live workers have (``POST /runs`` and ``POST /runs/validate``).

Rules (README "Admission"):

- **Absurd plans** (:func:`absurd_errors`): more than :data:`MAX_PARAMETERS` parameters,
  :data:`MAX_RANK_MEMORY_BYTES` per rank, :data:`MAX_OPTIMIZER_STEPS` optimizer steps,
  :data:`MAX_MICRO_BATCHES` micro-batches per rank, :data:`MAX_CHECKPOINTS` checkpoints or
  :data:`MAX_TOTAL_FLOPS` FLOPs: always refused, with no worker live and with
  ``MOEJOBS_ALLOW_UNSCHEDULABLE`` too.
- **Capacity** (:func:`admit`): the live workers that can serve the device count are compared
  with the estimate's memory per rank on each one's device kind (:func:`rank_memory_bytes`:
  the CPU peak against a CPU worker's host memory, the GPU peak against a GPU's memory); the
  worker with the most room decides. More than :data:`REFUSE_FACTOR` x its memory per device
  is refused; from
  :data:`WARN_FACTOR` x a warning (the estimate has not been checked against a GPU's measured
  peak yet). A worker that reported no memory never causes a refusal. A CPU worker's memory
  is its host's, shared by the CPU workers of that host. Checkpoints kept at once (retention
  ``MOEJOBS_KEEP_CHECKPOINTS``) beyond the free space under RUNS_DIR and an expected time
  beyond ``MOEJOBS_LONG_RUN_SECONDS`` on the fastest live worker kind are warnings.
- **Calibration**: the expected time on each live worker kind comes from the speed that
  succeeded runs of the same model config reached on that kind (``measured``), else from the
  model FLOP/s that other configs reached there (``scaled``), else from the GPU's datasheet
  peak at the estimate's MFU (``datasheet``); a CPU kind with none of these has no figure
  (``none``). Rows: ``service.models.Throughput``, written by ``service.runs``.

Refusals are returned, not raised: the API turns them into 422 ``unschedulable`` (or, for the
capacity ones with ALLOW_UNSCHEDULABLE, into warnings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlmodel import Session

from service import contract, reads
from service import runs as runs_service
from service.estimate import Estimate, estimate
from service.models import Throughput, Worker

if TYPE_CHECKING:  # pragma: no cover
    from service.config.train import TrainConfig
    from service.config.validate import Validated
    from service.settings import Settings

__all__ = [
    "WARN_FACTOR",
    "REFUSE_FACTOR",
    "MAX_PARAMETERS",
    "MAX_RANK_MEMORY_BYTES",
    "MAX_OPTIMIZER_STEPS",
    "MAX_MICRO_BATCHES",
    "MAX_CHECKPOINTS",
    "MAX_TOTAL_FLOPS",
    "rank_memory_bytes",
    "kept_checkpoint_bytes",
    "absurd_errors",
    "Slot",
    "slots",
    "expected_times",
    "Verdict",
    "admit",
]

#: From this fraction of the largest live worker's memory per device: a warning.
WARN_FACTOR = 0.9
#: Above this multiple of it: refused (the margin covers the estimate's error until a GPU
#: check has validated it against a measured peak).
REFUSE_FACTOR = 1.25

#: Bounds no machine could ever run (refused whatever the fleet): 10 trillion parameters
#: (about 5x the largest published dense or MoE models, whose weights alone would take
#: 20 TB in bf16)...
MAX_PARAMETERS = 10**13
#: ... 1 PiB of training memory for one rank (no accelerator or host comes near it) ...
MAX_RANK_MEMORY_BYTES = 2**50
#: ... a billion optimizer steps (31 years at one step per second) ...
MAX_OPTIMIZER_STEPS = 10**9
#: ... ten billion micro-batches per rank ...
MAX_MICRO_BATCHES = 10**10
#: ... a million checkpoints written (each one a full model with its optimizer state) ...
MAX_CHECKPOINTS = 10**6
#: ... and 1e29 training FLOPs (hundreds of times the largest training runs published).
MAX_TOTAL_FLOPS = 1e29

_TRAIN = ["body", "train_config"]
_MODEL = ["body", "model_config"]


def rank_memory_bytes(est: Estimate, device_kind: str = "cuda") -> int:
    """The memory one data-parallel rank needs on a ``device_kind`` ("cuda": GPU device memory,
    "cpu": host memory) worker, in bytes: THE figure admission compares with a worker's memory
    per device (``est.memory.for_device``; kept behind this one accessor so that the estimate's
    formulas can change without touching the rules)."""
    return int(est.memory.for_device(device_kind))


def kept_checkpoint_bytes(est: Estimate, keep_checkpoints: int) -> int:
    """Bytes of the checkpoints a run holds on disk at once: ``min(written, keep + 1)``
    resumable checkpoints (retention keeps the ``keep`` newest step folders while the next
    one or final/ is written; ``keep`` 0 keeps all)."""
    written = est.checkpoints_written
    held = written if keep_checkpoints <= 0 else min(written, keep_checkpoints + 1)
    return held * est.checkpoint_with_optimizer_bytes


def fmt_bytes(n: float) -> str:
    """``25.5 GiB``-style binary units (B to YiB; beyond that in scientific notation)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"):
        if abs(value) < 1024 or unit == "YiB":
            if unit == "YiB" and abs(value) >= 1024:
                return f"{value:.3g} YiB"
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_seconds(s: float) -> str:
    """``3 d 4 h``, ``5 h 12 min``, ``42 s`` or ``1.2e+09 years``."""
    if s >= 365 * 86400 * 1000:
        return f"{s / (365 * 86400):.2g} years"
    if s >= 86400:
        return f"{int(s // 86400)} d {int(s % 86400 // 3600)} h"
    if s >= 3600:
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    if s >= 60:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{s:.1f} s"


def _num(n: float) -> str:
    return f"{n:,}" if isinstance(n, int) and abs(n) < 10**9 else f"{float(n):.3g}"


# -- absurd plans -------------------------------------------------------------------------------


def _error(loc: list[Any], msg: str) -> dict[str, Any]:
    return {"loc": list(loc), "msg": msg, "type": "unschedulable"}


def absurd_errors(validated: Validated, est: Estimate) -> list[dict[str, Any]]:
    """``errors`` entries (``loc``, ``msg``, ``type`` "unschedulable") for a plan no machine
    could ever run, whatever the fleet (module docstring); [] when none applies."""
    model, train = validated.model, validated.train
    t = train.train
    plan = est.plan
    out: list[dict[str, Any]] = []
    params = est.params.total
    if params > MAX_PARAMETERS:
        if model.is_moe:
            # validation refuses an MoE model without it (service.config.model)
            assert model.moe_intermediate_size is not None
            width = ("moe_intermediate_size", model.moe_intermediate_size)
        else:
            width = ("intermediate_size", model.resolved_intermediate_size)
        fields = [
            ("n_layer", model.n_layer),
            ("n_embd", model.n_embd),
            ("n_expert", model.n_expert) if model.is_moe else None,
            width,
            ("padded_vocab_size", model.resolved_padded_vocab_size),
        ]
        shown = ", ".join(f"{k} {_num(v)}" for k, v in filter(None, fields))
        out.append(
            _error(
                _MODEL,
                f"the model has {_num(params)} parameters ({shown}): more "
                f"than {MAX_PARAMETERS:.0e}, which no machine can train; make it "
                f"smaller",
            )
        )
    need = max(rank_memory_bytes(est, "cpu"), rank_memory_bytes(est, "cuda"))
    if need > MAX_RANK_MEMORY_BYTES and params <= MAX_PARAMETERS:
        out.append(
            _error(
                [*_TRAIN, "train", "micro_batch_size"],
                f"one rank would need {fmt_bytes(need)} of memory (micro_batch_size "
                f"{_num(t.micro_batch_size)} samples of {_num(plan.seq_len)} tokens): "
                f"more than "
                f"{fmt_bytes(MAX_RANK_MEMORY_BYTES)}, which no machine has",
            )
        )
    if t.max_steps is not None and t.max_steps < plan.steps_from_tokens:
        steps_field, steps_value = "max_steps", t.max_steps
    else:
        steps_field, steps_value = "max_tokens", t.max_tokens
    if plan.optimizer_steps > MAX_OPTIMIZER_STEPS:
        out.append(
            _error(
                [*_TRAIN, "train", steps_field],
                f"{steps_field} {_num(steps_value)} plans {_num(plan.optimizer_steps)} "
                f"optimizer steps of {_num(plan.tokens_per_step)} tokens: more than "
                f"{MAX_OPTIMIZER_STEPS:.0e}; lower {steps_field} or raise "
                f"global_batch_size",
            )
        )
    elif plan.micro_batches_trained > MAX_MICRO_BATCHES:
        out.append(
            _error(
                [*_TRAIN, "train", steps_field],
                f"{steps_field} {_num(steps_value)} plans "
                f"{_num(plan.micro_batches_trained)} micro-batches per rank: more than "
                f"{MAX_MICRO_BATCHES:.0e}; lower {steps_field}",
            )
        )
    if est.checkpoints_written > MAX_CHECKPOINTS:
        # more than final/ is written only with a save_interval (service.estimate)
        assert t.save_interval is not None
        out.append(
            _error(
                [*_TRAIN, "train", "save_interval"],
                f"save_interval {_num(t.save_interval)} writes "
                f"{_num(est.checkpoints_written)} checkpoints over "
                f"{_num(plan.optimizer_steps)} steps: more than {MAX_CHECKPOINTS:.0e}; "
                f"raise save_interval",
            )
        )
    if est.total_flops > MAX_TOTAL_FLOPS and not out:
        out.append(
            _error(
                [*_TRAIN, "train", "max_tokens"],
                f"the run needs {float(est.total_flops):.3g} FLOPs "
                f"({_num(plan.tokens_trained)} tokens x {float(est.flops_per_token):.3g} "
                f"FLOPs per token): more than {MAX_TOTAL_FLOPS:.0e}; lower max_tokens",
            )
        )
    return out


# -- the fleet ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One live worker as admission sees it.

    Attributes:
        worker_id, host: the worker row's.
        kind: ``Worker.kind`` ("NVIDIA H200", "cpu: <model>"), or "unknown".
        devices: GPUs it owns (0 = CPU worker).
        memory_per_device: bytes a rank may use: the smallest GPU's memory, or for a CPU
            worker the host's memory; None when the worker reported none.
        shared_by: CPU workers of the same host sharing ``memory_per_device`` (1 for GPUs).
        free_bytes: free space under RUNS_DIR (None = not reported).
    """

    worker_id: str
    host: str
    kind: str
    devices: int
    memory_per_device: int | None
    shared_by: int
    free_bytes: int | None

    @property
    def cpu(self) -> bool:
        return self.devices == 0

    @property
    def device_kind(self) -> str:
        """What a rank's memory is on this worker: "cpu" (host memory) or "cuda"."""
        return "cpu" if self.cpu else "cuda"

    def describe(self) -> str:
        """``worker w1 (NVIDIA H200, 139.8 GiB per GPU)``."""
        if self.memory_per_device is None:
            mem = "no memory reported"
        elif self.cpu:
            shared = (
                f", shared by {self.shared_by} CPU workers of host {self.host}"
                if self.shared_by > 1
                else ""
            )
            mem = f"{fmt_bytes(self.memory_per_device)} host memory{shared}"
        else:
            mem = f"{fmt_bytes(self.memory_per_device)} per GPU"
        return f"worker {self.worker_id} ({self.kind}, {mem})"


def slots(workers: list[Worker]) -> list[Slot]:
    """:class:`Slot` of each worker (CPU workers of one host counted as sharing its memory)."""
    cpu_per_host: dict[str, int] = {}
    for w in workers:
        if w.gpu_count == 0:
            cpu_per_host[w.host] = cpu_per_host.get(w.host, 0) + 1
    out = []
    for w in workers:
        cpu = w.gpu_count == 0
        memory = w.host_memory_bytes if cpu else w.gpu_memory_bytes
        out.append(
            Slot(
                worker_id=w.id,
                host=w.host,
                kind=w.kind or "unknown",
                devices=w.gpu_count,
                memory_per_device=memory if memory else None,
                shared_by=cpu_per_host[w.host] if cpu else 1,
                free_bytes=w.free_bytes,
            )
        )
    return out


def expected_times(
    est: Estimate, precision: str, model_key: str, kinds: list[str], rows: list[Throughput]
) -> list[dict[str, Any]]:
    """The expected training time on each worker kind in ``kinds`` (sorted fastest first,
    kinds without a figure last): ``{"kind", "time_s" (None without a figure), "source"
    ("measured" | "scaled" | "datasheet" | "none"), "basis"}``.

    ``measured``: tokens_trained / (tokens/s per device of this model config's finished runs
    on that kind x world_size); ``scaled``: total FLOPs / (model FLOP/s per device that other
    configs reached there x world_size); ``datasheet``: total FLOPs / (world_size x the GPU's
    peak (``service.contract.PEAK_FLOPS``) x the estimate's MFU). Data parallelism is assumed
    to scale linearly."""
    world = est.plan.world_size
    tokens = est.plan.tokens_trained
    out = []
    for kind in sorted(set(kinds)):
        mine = [r for r in rows if r.worker_kind == kind]
        exact = next((r for r in mine if r.model_key == model_key), None)
        others = [
            r.flops_per_sec_per_device
            for r in mine
            if r.model_key != model_key and r.flops_per_sec_per_device
        ]
        peak = contract.peak_flops_per_device(kind, precision)
        if exact is not None:
            tps = exact.tokens_per_sec_per_device * world
            entry = {
                "time_s": tokens / tps,
                "source": "measured",
                "basis": f"{tps:,.4g} tokens/s measured on {exact.runs} finished run(s) of "
                f"this model config",
            }
        elif others:
            flops = sum(others) / len(others)
            entry = {
                "time_s": float(est.total_flops) / (flops * world),
                "source": "scaled",
                "basis": f"{flops / 1e12:,.4g} TFLOP/s per device reached by "
                f"{len(others)} other model config(s) on this kind",
            }
        elif peak is not None:
            entry = {
                "time_s": float(est.total_flops) / (world * peak * est.mfu),
                "source": "datasheet",
                "basis": f"datasheet peak {peak / 1e12:,.4g} TFLOP/s at {est.mfu:.0%} MFU",
            }
        else:
            entry = {
                "time_s": None,
                "source": "none",
                "basis": "no figure yet: no run has finished on this kind and it has no "
                "datasheet entry (CPUs have none); the first run to succeed "
                "here calibrates it",
            }
        out.append({"kind": kind, **entry})
    out.sort(key=lambda e: (e["time_s"] is None, e["time_s"] or 0.0))
    return out


# -- the verdict --------------------------------------------------------------------------------


@dataclass
class Verdict:
    """What :func:`admit` found.

    Attributes:
        refusals: ``errors`` entries refused for the fleet (422 ``unschedulable``, or warnings
            with ALLOW_UNSCHEDULABLE).
        warnings: ``{"loc", "msg"}`` entries.
        fleet: added to the estimate as ``estimate["fleet"]``: ``memory_per_rank_bytes``,
            ``kept_checkpoint_bytes``, ``largest_worker`` and ``time`` (see
            :func:`expected_times`; each entry also gives ``workers``, the live workers of
            that kind that can serve the run).
    """

    refusals: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    fleet: dict[str, Any] = field(default_factory=dict)


def _devices(validated: Validated) -> int:
    devices = validated.train.devices
    return 1 if devices == "auto" else int(devices)


def _with_train(validated: Validated, **train_updates: Any) -> TrainConfig:
    t = validated.train
    return t.model_copy(update={"train": t.train.model_copy(update=train_updates)})


def remedies(validated: Validated, capacity: int, device_kind: str = "cuda") -> list[str]:
    """Changes that bring the estimate's memory per rank on ``device_kind`` within ``capacity``
    bytes, computed with the estimator: gradient checkpointing, and the largest smaller
    micro_batch_size (with and without it) that divides global_batch_size / world_size."""
    t = validated.train.train
    model = validated.model
    world = validated.train.world_size

    def need(**updates: Any) -> int:
        return rank_memory_bytes(estimate(_with_train(validated, **updates), model), device_kind)

    out = []
    options = [t.gradient_checkpointing] + ([True] if not t.gradient_checkpointing else [])
    if not t.gradient_checkpointing and (n := need(gradient_checkpointing=True)) <= capacity:
        out.append(f"gradient_checkpointing: true ({fmt_bytes(n)})")
    for ckpt in options:
        if (
            t.micro_batch_size <= 1
            or need(micro_batch_size=1, gradient_checkpointing=ckpt) > capacity
        ):
            continue
        lo, hi = 1, t.micro_batch_size - 1  # memory grows with the micro-batch: bisect
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if need(micro_batch_size=mid, gradient_checkpointing=ckpt) <= capacity:
                lo = mid
            else:
                hi = mid - 1
        m = next(
            (m for m in range(lo, max(0, lo - 4096), -1) if t.global_batch_size % (m * world) == 0),
            None,
        )
        if m is None:
            continue
        what = f"micro_batch_size {m}" + (
            " with gradient_checkpointing: true" if ckpt and not t.gradient_checkpointing else ""
        )
        out.append(f"{what} ({fmt_bytes(need(micro_batch_size=m, gradient_checkpointing=ckpt))})")
        break
    return out


def admit(session: Session, settings: Settings, validated: Validated, est: Estimate) -> Verdict:
    """Compare a validated run and its estimate with the live workers (module docstring).
    Reads the ``workers`` and ``throughput`` tables; writes nothing."""
    verdict = Verdict()
    devices = _devices(validated)
    need = rank_memory_bytes(est)  # on a GPU; _check_memory replaces it by the best slot's kind
    kept = kept_checkpoint_bytes(est, settings.keep_checkpoints)
    verdict.fleet = {
        "memory_per_rank_bytes": need,
        "kept_checkpoint_bytes": kept,
        "largest_worker": None,
        "time": [],
    }
    if validated.train.num_nodes > 1:
        verdict.refusals.append(
            _error(
                [*_TRAIN, "num_nodes"],
                f"num_nodes {validated.train.num_nodes}: a moejobs worker "
                f"runs a job on one machine; use num_nodes 1",
            )
        )
        return verdict
    workers = reads.live_workers(session, settings.worker_stale_seconds, role="trains")
    live = slots(workers)
    able = [s for s, w in zip(live, workers, strict=True) if reads.worker_can_serve(w, devices)]
    if not able:
        if not live:
            msg = (
                f"no live worker (none heartbeated in the last "
                f"{settings.worker_stale_seconds:g} s) can run it: start one with `moejobs "
                f"worker`, or set MOEJOBS_ALLOW_UNSCHEDULABLE=true to queue anyway"
            )
        else:
            most = max(s.devices for s in live)
            msg = (
                f"devices {devices}: no live worker can serve it (the largest has {most} "
                f"GPU(s); {len(live)} live worker(s)); lower devices or add a worker with "
                f"more GPUs"
            )
        verdict.refusals.append(_error([*_TRAIN, "devices"], msg))
        return verdict

    _check_memory(verdict, validated, est, able)
    _check_storage(verdict, kept, est, settings, able)

    precision = validated.train.precision
    key = runs_service.throughput_key(validated.model.model_dump(mode="json"), precision)
    kinds = [s.kind for s in able]
    times = expected_times(est, precision, key, kinds, reads.throughputs(session, kinds))
    for entry in times:
        entry["workers"] = sum(1 for s in able if s.kind == entry["kind"])
    verdict.fleet["time"] = times
    fastest = next((e for e in times if e["time_s"] is not None), None)
    if fastest is not None and fastest["time_s"] > settings.long_run_seconds:
        verdict.warnings.append(
            {
                "loc": [*_TRAIN, "train", "max_tokens"],
                "msg": (
                    f"expected to take {fmt_seconds(fastest['time_s'])} on the fastest live worker kind "
                    f"({fastest['kind']}, {fastest['source']}: {fastest['basis']}): more than "
                    f"MOEJOBS_LONG_RUN_SECONDS ({fmt_seconds(settings.long_run_seconds)})"
                ),
            }
        )
    return verdict


def _check_memory(verdict: Verdict, validated: Validated, est: Estimate, able: list[Slot]) -> None:
    """Compare the rank's need on each worker's device kind (host memory for a CPU worker,
    device memory for a GPU worker) with its memory; the worker it fits best decides."""
    known = [s for s in able if s.memory_per_device is not None]
    unknown = [s for s in able if s.memory_per_device is None]
    if not known:
        return
    best = min(
        known,
        key=lambda s: (
            rank_memory_bytes(est, s.device_kind) / (s.memory_per_device or 1),
            -(s.memory_per_device or 0),
        ),
    )
    kind = best.device_kind
    need = rank_memory_bytes(est, kind)
    cap = best.memory_per_device or 0
    ratio = need / cap
    verdict.fleet["memory_per_rank_bytes"] = need
    verdict.fleet["largest_worker"] = {
        "worker_id": best.worker_id,
        "kind": best.kind,
        "device_kind": kind,
        "memory_per_device_bytes": cap,
        "memory_per_rank_bytes": need,
        "ratio": ratio,
    }
    mem = (
        f"the estimate needs {fmt_bytes(need)} per rank "
        f"({'host memory on a CPU' if kind == 'cpu' else 'device memory on a GPU'})"
    )
    where = best.describe()
    if ratio > REFUSE_FACTOR:
        fixes = remedies(validated, cap, kind)
        hint = (
            f"; it would fit with {' or '.join(fixes)}"
            if fixes
            else "; no smaller micro_batch_size or gradient checkpointing fits: make the "
            "model smaller or add a worker with more memory"
        )
        msg = (
            f"{mem}, {ratio:.2f}x the memory of the live worker that can run it with the most room, "
            f"{where} (at most {REFUSE_FACTOR}x is accepted){hint}"
        )
        if unknown:  # a worker of unknown size might hold it
            verdict.warnings.append(
                {
                    "loc": _loc_for(est),
                    "msg": msg
                    + (
                        f" (queued: {len(unknown)} live worker(s) reported no memory, e.g. "
                        f"{unknown[0].worker_id})"
                    ),
                }
            )
        else:
            verdict.refusals.append(_error(_loc_for(est), msg))
        return
    if ratio >= WARN_FACTOR:
        fixes = remedies(validated, int(cap * WARN_FACTOR), kind) if ratio > 1 else []
        why = (
            "the CPU estimate is within about 15% of measured peaks (bench/RESULTS.md), not closer"
            if kind == "cpu"
            else "the estimate has not been checked against a GPU's measured peak yet"
        )
        hint = f"; it fits with margin with {' or '.join(fixes)}" if fixes else ""
        verdict.warnings.append(
            {
                "loc": _loc_for(est),
                "msg": (
                    f"{mem}, {ratio:.2f}x the memory of {where}: {why}, so the run may run out of "
                    f"memory{hint}"
                ),
            }
        )
        return
    if best.cpu and best.shared_by > 1 and need >= WARN_FACTOR * cap / best.shared_by:
        verdict.warnings.append(
            {
                "loc": _loc_for(est),
                "msg": (
                    f"{mem}: it fits {where} only while the other CPU workers of that host leave "
                    f"their share free ({fmt_bytes(cap / best.shared_by)} each)"
                ),
            }
        )


def _loc_for(est: Estimate) -> list[Any]:
    """The model config when its state (weights, gradients, optimizer states, autocast copies)
    outweighs what grows with the micro-batch (activations, the logits' gradient, backward
    temporaries), else the micro-batch."""
    m = est.memory
    state = m.weights + m.gradients + m.optimizer_states + m.autocast_weight_copies
    batch = m.activations + m.logits_gradient + m.backward_temporaries
    return list(_MODEL) if state >= batch else [*_TRAIN, "train", "micro_batch_size"]


def _check_storage(
    verdict: Verdict, kept: int, est: Estimate, settings: Settings, able: list[Slot]
) -> None:
    known = [s for s in able if s.free_bytes is not None]
    if not known or kept <= 0:
        return
    best = max(known, key=lambda s: s.free_bytes or 0)
    free = best.free_bytes or 0
    if kept > free:
        keep = settings.keep_checkpoints
        held = kept // max(1, est.checkpoint_with_optimizer_bytes)
        verdict.warnings.append(
            {
                "loc": [*_TRAIN, "train", "save_interval"],
                "msg": (
                    f"the run keeps up to {held} checkpoint(s) of "
                    f"{fmt_bytes(est.checkpoint_with_optimizer_bytes)} at once ({fmt_bytes(kept)}; "
                    f"{est.checkpoints_written} written, MOEJOBS_KEEP_CHECKPOINTS {keep}"
                    f"{' keeps all' if keep == 0 else ''}), more than the {fmt_bytes(free)} free under "
                    f"RUNS_DIR on {best.describe()}: the run would fail with no_space"
                ),
            }
        )
