"""The training engine: LitGPT's model on Lightning Fabric, in moejobs' own loop.

Built from LitGPT parts (``litgpt.GPT``, ``litgpt.Config``, ``litgpt.Tokenizer``,
``litgpt.utils.chunked_cross_entropy``, ``litgpt.utils.save_config``) and Lightning Fabric;
LitGPT's ``pretrain.py`` cannot run this project's configs. Read top-down, as LitGPT's
``pretrain.py`` reads setup -> main -> fit: :func:`main` (the process) -> :func:`run_training`
(one validated config pair) -> ``_run`` (out_dir, resume, data, ranks, Fabric) ->
``_train_loop`` (model, optimizer and the optimizer-step loop, its state in ``_Loop``); then
the pre-flight, model, optimizer and signal pieces they use, and small helpers last.

Public API:

* :func:`run_training` — train one validated config pair; raises ``worker.errors`` exceptions.
* :func:`preflight` — the machine checks made before anything else.
* :func:`build_model`, :func:`lm_loss` — the model and loss exactly as training uses them.
* ``python -m worker.train --train-config T.yaml --model-config M.yaml [--no-checkpoints]``
  (what ``python -m worker.entry`` runs after installing its signal handlers): exit codes
  ``service.contract.ExitCode``: 0 done, 1 training failure (``result.json`` has the reason:
  invalid_data, out_of_memory, no_space, crashed), 2 invalid config or failed pre-flight, 75
  stopped by SIGTERM/SIGINT after writing a resumable checkpoint, 76 fenced (``worker.fence``),
  130/143 SIGINT/SIGTERM before the first optimizer step (nothing trained).

Files written in ``out_dir``: ``metrics.csv`` (see ``worker.metrics``), ``router.csv``,
``train.log``, ``events.jsonl`` and ``result.json`` (``service.contract``, rank 0, through
``worker.reporting``), ``step-XXXXXXXX/`` every ``save_interval`` optimizer steps and ``final/``
at the end (see ``worker.checkpoint``). Tokens are cached outside ``out_dir`` and the input
folders (``worker.data``).

Signals: until the first optimizer step begins, SIGINT/SIGTERM end the process at once with
one line (``interrupted before training started``) and 130/143 when ``worker.early``'s
handlers are installed (``run_train.py``, ``python -m worker.entry``); otherwise they are
recorded and checked right before the loop (:meth:`StopFlag.arm`). From then on they stop the
run at the next optimizer-step boundary with a checkpoint (exit 75).

Resume rules (``resume``):

* ``"auto"``: continue from the complete checkpoint with the highest step (``final/`` included)
  whose files load; newer ones that do not (a truncated ``lit_model.pth``) are skipped with a
  warning naming the file; start fresh when there is none, fail naming the files when none
  loads. A ``final/`` that already reached the planned number of steps
  means there is nothing more to do: the run returns at once (exit 0).
* ``true``: the same, but having no checkpoint is an error.
* a path: continue from that checkpoint folder.
* ``false``: start fresh. An ``out_dir`` that already holds a checkpoint is refused (pre-flight
  error naming ``resume``) rather than silently overwritten; a ``metrics.csv`` without any
  checkpoint (a smoke test, a run killed before its first checkpoint) is simply started over.

Continuing restores the weights, the optimizer state, the step counter, the data position
(samples consumed, so the same micro-batches follow) and the RNG states; the learning-rate
schedule is a pure function of the step and the plan, so it continues where it was. Rows of
``metrics.csv`` after the resumed step are dropped before new ones are appended.

Before continuing, the checkpoint's record of its run (``worker.checkpoint.resume_record``: the
SHA-256 of the raw training and validation text, the tokenizer's hash, the plan) is compared
with this run (``worker.checkpoint.check_resume``): other data, another tokenizer, or another
lr, min_lr, warm-up, global batch size or sequence length is a ``PreflightError`` naming
``resume`` and each difference, unless ``resume_allow_changes`` lists it; another run length
(``max_tokens``/``max_steps``) is logged as a warning naming the old and new schedule, and so is
a checkpoint trained on tokens of another token-cache format (``worker.data.CACHE_FORMAT``; the
warning is also the ``data_ready`` event's message). With
``initial_checkpoint_dir``, ``resume: auto``/``true`` continues the run's own checkpoint and the
initial weights are used only when it has none.

Imports: LitGPT and Lightning (and ``worker.moe``, ``worker.gqa``, which import LitGPT) are
imported where first used, never at the top: Lightning sets up its loggers when imported, by
whether the root logger has handlers yet, so in the training process they must come after
:func:`main` configured logging. ``torch._inductor`` is imported only for a CPU compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import resource
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from service import contract
from service.config.issues import ConfigError
from service.config.model import ModelConfig
from service.config.parse import load_document
from service.config.plan import TrainingPlan, training_plan
from service.config.train import TrainConfig
from service.config.validate import validate_configs
from service.contract import EventKind, ExitCode
from service.estimate import estimate
from service.settings import Settings, get_settings
from worker import checkpoint as ckpt
from worker import early, errors
from worker.attention import AttentionChoice, choose_backends
from worker.data import (
    CACHE_FORMAT,
    PreparedData,
    PrepProgress,
    WindowSampler,
    cache_root,
    prepare_data,
    source_text,
    validation_batches,
)
from worker.errors import EngineError, Interrupted, PreflightError
from worker.launch import RankProcesses, die_with_parent, externally_launched, is_rank_zero_env
from worker.metrics import MetricsWriter, model_flops_utilization
from worker.reporting import Reporter, raw_out_dir
from worker.tokenizer import load_tokenizer, tokenizer_hash

if TYPE_CHECKING:  # pragma: no cover
    import litgpt

log = logging.getLogger("moejobs.train")

#: A precision name (the config's ``Precision`` or any string Lightning accepts).
_Precision = TypeVar("_Precision", bound=str)

_OPTIMIZERS = {
    "torch.optim.AdamW": torch.optim.AdamW,
    "torch.optim.Adam": torch.optim.Adam,
    "torch.optim.SGD": torch.optim.SGD,
}


# --------------------------------------------------------------------------------------------------
# python -m worker.train
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m worker.train`` (and of ``python -m worker.entry``); returns the
    exit code (``service.contract.ExitCode``; see the module docstring). On rank 0 it writes
    ``out_dir/result.json`` for every end it can report: ``out_dir`` of the validated config, or
    of the raw document when the config is invalid (``worker.reporting.raw_out_dir``). Every
    failure also ends with one line ``error: <reason>: <message>`` on stderr."""
    die_with_parent()
    parser = argparse.ArgumentParser(
        prog="python -m worker.train", description="Run one training job."
    )
    parser.add_argument("--train-config", required=True, help="resolved train config (YAML/JSON)")
    parser.add_argument("--model-config", required=True, help="resolved model config (YAML/JSON)")
    parser.add_argument(
        "--no-checkpoints", action="store_true", help="write no checkpoint (smoke test)"
    )
    args = parser.parse_args(argv)
    rank_zero = is_rank_zero_env()
    logging.basicConfig(
        level=logging.INFO if rank_zero else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    reporter = Reporter(raw_out_dir(args.train_config), enabled=rank_zero)
    reporter.install_early_exit()
    try:
        validated = validate_configs(
            load_document(args.train_config), load_document(args.model_config)
        )
    except ConfigError as exc:
        print("error: invalid config\n" + str(exc), file=sys.stderr, flush=True)
        reporter.failed(
            PreflightError(
                "invalid config: "
                + "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            )
        )
        return int(ExitCode.INVALID_CONFIG)
    reporter.retarget(validated.train.out_dir)
    reporter.install_early_exit()
    if rank_zero:
        for warning in validated.warnings:
            log.warning("config: %s", warning)
    try:
        result = run_training(
            validated.train,
            validated.model,
            write_checkpoints=not args.no_checkpoints,
            reporter=reporter,
            plan=validated.plan,
        )
    except KeyboardInterrupt as exc:  # a second Ctrl-C during training: no checkpoint
        text = exc.args[0] if exc.args else "interrupted"
        reporter.failed(
            Interrupted(text, signal_name="SIGINT", exit_code=ExitCode.SIGINT_BEFORE_START)
        )
        print(f"interrupted: {text}", file=sys.stderr, flush=True)
        return int(ExitCode.SIGINT_BEFORE_START)
    except Exception as exc:
        err = errors.classify(exc, validated.train.out_dir)
        if (
            err is not exc
        ):  # not one of ours: the traceback for the log, the reason on the last line
            traceback.print_exc()
        reporter.failed(err)
        if isinstance(err, Interrupted) and str(err) == errors.BEFORE_START:
            print(errors.BEFORE_START, file=sys.stderr, flush=True)  # as the early handlers say it
        else:
            print(f"error: {err.label}: {err}", file=sys.stderr, flush=True)
        return int(err.exit_code)
    reporter.succeeded(result)
    if rank_zero:
        print(
            json.dumps(
                {
                    "steps": result.steps,
                    "tokens": result.tokens,
                    "final_loss": result.final_loss,
                    "val_loss": result.val_loss,
                    "checkpoint_dir": str(result.checkpoint_dir) if result.checkpoint_dir else None,
                    "peak_memory_bytes": result.peak_memory_bytes,
                    "elapsed_s": round(result.elapsed_s, 3),
                    "stopped_by": result.stopped_by,
                }
            ),
            flush=True,
        )
    return int(ExitCode.OK)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run_training(
    train: TrainConfig,
    model: ModelConfig,
    *,
    write_checkpoints: bool = True,
    on_row: Callable[[dict, TrainingPlan], None] | None = None,
    reporter: Reporter | None = None,
    settings: Settings | None = None,
    plan: TrainingPlan | None = None,
) -> TrainingResult:
    """Train ``model`` as ``train`` says; see the module docstring for files and resume rules.

    Args:
        train, model: a validated pair (``service.config.validate.validate_configs``).
        write_checkpoints: False writes no checkpoint at all (the smoke test); metrics.csv is
            still written.
        on_row: called on rank 0 with every metrics.csv row (a dict keyed by the header; values
            None when empty) and the plan, e.g. for a progress bar.
        reporter: where events go and progress is kept (``worker.reporting``); default a new
            one for ``train.out_dir`` (rank 0 only). The caller writes ``result.json`` with it.
        settings: the service settings the engine reads: ``peak_tflops``
            (``MOEJOBS_PEAK_TFLOPS``, the GPU peak behind the ``mfu`` column), on a CUDA
            device only; default ``service.settings.get_settings()``, read only then.
        plan: the pair's training plan (``Validated.plan``); None computes it.

    Returns:
        :class:`TrainingResult` (on every rank; rank 0's is the one to report).

    Raises:
        PreflightError: the machine cannot run the config, or the resume setting cannot be met.
        DataError: the data or tokenizer is unusable (message names the file or folder).
        CheckpointError: the checkpoint to resume from does not load (names the file).
        NoSpace: a write failed on a full filesystem (names the path and its free space).
        Interrupted: SIGTERM/SIGINT; a checkpoint ``step-XXXXXXXX`` was written (unless
            ``write_checkpoints`` is False) and the run resumes from it with ``resume: auto``;
            or, before the first optimizer step, nothing was trained (exit code 130/143).
        EngineError: a rank process failed.
    """
    started = time.perf_counter()
    out_dir = Path(train.out_dir)
    rank_zero = is_rank_zero_env()
    if reporter is None:
        reporter = Reporter(out_dir, enabled=rank_zero)
    stop = StopFlag(
        on_signal=lambda signum: reporter.event(
            EventKind.stop_requested,
            step=reporter.progress.steps,
            message=signal.Signals(signum).name,
            signal=signal.Signals(signum).name,
        )
    )
    stop.install()  # before anything slow: a signal from here on is never lost
    try:
        if plan is None:
            plan = training_plan(train, model)
        preflight(train)
        reporter.progress.planned_steps = plan.optimizer_steps
        reporter.event(EventKind.configured, planned_steps=plan.optimizer_steps)
        env_before = dict(os.environ)
        threads_before = torch.get_num_threads()
        with _run_log(out_dir, enabled=rank_zero):
            try:
                return _run(
                    train,
                    model,
                    plan,
                    out_dir=out_dir,
                    rank_zero=rank_zero,
                    write_checkpoints=write_checkpoints,
                    on_row=on_row,
                    stop=stop,
                    started=started,
                    reporter=reporter,
                    settings=settings,
                )
            finally:
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()
                os.environ.clear()
                os.environ.update(env_before)
                torch.set_num_threads(threads_before)
    finally:
        stop.restore()


@dataclass
class TrainingResult:
    """What a finished (or already finished) run reports.

    Attributes:
        steps: optimizer steps completed (all sessions).
        tokens: tokens trained, all ranks, all sessions.
        final_loss: training loss of the last step (None when no step ran in this session and the
            checkpoint recorded none).
        val_loss: last validation loss, if any validation ran.
        checkpoint_dir: the final checkpoint folder, or None when checkpoints are off.
        peak_memory_bytes: peak GPU memory allocated (CUDA) or peak resident set size of the rank-0
            process (CPU), in bytes.
        elapsed_s: wall time of this call, seconds.
        out_dir: the run folder.
        stopped_by: "completed", "max_time" or "nothing_to_do".
    """

    steps: int
    tokens: int
    final_loss: float | None
    val_loss: float | None
    checkpoint_dir: Path | None
    peak_memory_bytes: int
    elapsed_s: float
    out_dir: Path
    stopped_by: str = "completed"


def _run(
    train: TrainConfig,
    model_cfg: ModelConfig,
    plan: TrainingPlan,
    *,
    out_dir: Path,
    rank_zero: bool,
    write_checkpoints: bool,
    on_row: Callable[[dict, TrainingPlan], None] | None,
    stop: StopFlag,
    started: float,
    reporter: Reporter,
    settings: Settings | None,
) -> TrainingResult:
    """Set the run up (LitGPT's ``setup``): out_dir and the checkpoint to resume, the tokenizer
    and the token cache, the extra rank processes and Fabric; then :func:`_train_loop`. Returns
    at once when ``final/`` already reached the plan."""
    import lightning as L

    t = train.train
    device_type = "cuda" if torch.cuda.is_available() else "cpu"

    # ---- out_dir and resume (rank 0 decides; other ranks get the decision in their config)
    if rank_zero:
        for line in ckpt.clean_stale(out_dir):
            log.info("out_dir: %s", line)
    resume_from = _resolve_resume(train, out_dir)
    if resume_from is not None:
        _progress_from(reporter, resume_from)
    if (
        resume_from is not None
        and resume_from.is_final
        and resume_from.step >= plan.optimizer_steps
    ):
        log.info(
            "final/ is at step %d and the plan has %d optimizer steps: nothing more to do",
            resume_from.step,
            plan.optimizer_steps,
        )
        meta = resume_from.meta
        return TrainingResult(
            steps=resume_from.step,
            tokens=int(meta.get("tokens", 0)),
            final_loss=meta.get("loss"),
            val_loss=meta.get("val_loss"),
            checkpoint_dir=resume_from.path,
            peak_memory_bytes=_peak_memory(torch.device("cpu")),
            elapsed_s=time.perf_counter() - started,
            out_dir=out_dir,
            stopped_by="nothing_to_do",
        )
    if plan.optimizer_steps < 1:
        raise PreflightError(
            f"train.max_tokens: {t.max_tokens} tokens do not fill one optimizer step of {plan.tokens_per_step} tokens"
        )

    # ---- tokenizer and data (rank 0 builds the cache before other ranks start)
    tokenizer_dir = train.tokenizer_dir or train.initial_checkpoint_dir
    if tokenizer_dir is None:
        raise PreflightError(
            "tokenizer_dir: a tokenizer folder is required (train one with `moejobs tokenizer train`)"
        )
    padded_vocab = model_cfg.resolved_padded_vocab_size
    tokenizer = load_tokenizer(Path(tokenizer_dir), padded_vocab)
    ev = train.eval
    need_val = bool(ev.interval) or ev.initial_validation or ev.final_validation
    args = train.data.init_args
    source = source_text(
        args.train_data_path, args.val_data_path
    )  # the raw text, hashed once per start
    tokenizer_sha = tokenizer_hash(Path(tokenizer_dir))
    if resume_from is not None:
        _check_resume(
            train,
            plan,
            resume_from,
            ckpt.resume_record(train, plan, source, tokenizer_sha),
            rank_zero,
        )

    def data_progress(
        p: PrepProgress,
    ) -> None:  # every PROGRESS_INTERVAL_S while tokenizing, and at the end
        if rank_zero:
            log.info("data: tokenizing: %s", p.describe())
        eta = p.eta_s
        reporter.event(
            EventKind.data_progress,
            message=p.describe(),
            tokens=p.tokens,
            bytes_done=p.bytes_done,
            bytes_total=p.bytes_total,
            tokens_per_s=round(p.tokens_per_s, 1),
            eta_s=round(eta, 1) if eta is not None else None,
            done=p.done,
        )

    try:
        data = prepare_data(
            args.train_data_path,
            args.val_data_path,
            tokenizer,
            tokenizer_dir,
            padded_vocab,
            plan.seq_len,
            plan.micro_batch_size,
            need_val,
            source=source,
            tokenizer_sha256=tokenizer_sha,
            on_progress=data_progress,
        )
    except OSError as exc:  # the token cache is the only thing prepare_data writes
        if errors.no_space_errno(exc) is None:
            raise
        raise errors.no_space(exc.filename or cache_root(), "the token cache") from exc
    format_change = (
        ckpt.token_format_change(resume_from, {"token_format": CACHE_FORMAT})
        if resume_from is not None
        else None
    )  # logged by _check_resume; the event says it too
    reporter.event(
        EventKind.data_ready,
        message=format_change,
        train_tokens=len(data.train),
        train_path=str(data.train.path),
        val_tokens=len(data.val) if data.val is not None else None,
    )
    if rank_zero:
        log.info(
            "data: %d training tokens in %s (%d windows of %d), validation: %s",
            len(data.train),
            data.train.path,
            data.train.n_windows(plan.seq_len + 1),
            plan.seq_len + 1,
            f"{len(data.val)} tokens in {data.val.path}" if data.val else "none",
        )
        log.info(
            "data.init_args.num_workers=%d: no DataLoader workers are started; micro-batches are "
            "gathered in-process from the memory-mapped token cache",
            args.num_workers,
        )

    # ---- ranks and Fabric
    ranks: RankProcesses | None = None
    if plan.world_size > 1 and not externally_launched():
        train_doc = train.model_dump(mode="json")
        train_doc["resume"] = str(resume_from.path) if resume_from is not None else False
        ranks = RankProcesses(
            plan.world_size, train_doc, model_cfg.model_dump(mode="json"), write_checkpoints
        )
        ranks.start()
    try:
        precision, note = lightning_precision(train.precision, device_type)
        if note and rank_zero:
            log.warning(note)
        fabric = L.Fabric(
            accelerator=device_type,
            devices=plan.world_size // train.num_nodes,
            num_nodes=train.num_nodes,
            strategy="ddp" if plan.world_size > 1 else "auto",
            precision=precision,
        )
        fabric.launch()
        result = _train_loop(
            _Loop(
                fabric=fabric,
                train=train,
                model_cfg=model_cfg,
                plan=plan,
                out_dir=out_dir,
                data=data,
                tokenizer_dir=tokenizer_dir,
                resume_from=resume_from,
                write_checkpoints=write_checkpoints,
                on_row=on_row,
                stop=stop,
                started=started,
                device_type=device_type,
                reporter=reporter,
                peak_tflops=_peak_tflops(settings, device_type),
            )
        )
    except BaseException:
        if ranks is not None:
            ranks.kill()
        raise
    if ranks is not None:
        codes = ranks.wait(timeout=120)
        bad = [(i + 1, c) for i, c in enumerate(codes) if c != 0]
        if bad:
            raise EngineError(
                f"rank process(es) failed: {', '.join(f'rank {r} exit {c}' for r, c in bad)}"
            )
    return result


@dataclass
class _Loop:
    """One training session, what :func:`_train_loop` works with: what ``_run`` hands it, the
    model, optimizer and outputs :func:`_build` and :func:`_open_outputs` add, and the progress
    the loop moves (restored from the checkpoint when resuming), which :meth:`save` writes."""

    # -- from _run
    fabric: Any  # lightning.Fabric, launched
    train: TrainConfig
    model_cfg: ModelConfig
    plan: TrainingPlan
    out_dir: Path
    data: PreparedData
    tokenizer_dir: str
    resume_from: ckpt.CheckpointInfo | None
    write_checkpoints: bool
    on_row: Callable[[dict, TrainingPlan], None] | None
    stop: StopFlag
    started: float  # time.perf_counter() when run_training began
    device_type: str  # "cuda" or "cpu"
    reporter: Reporter
    peak_tflops: float | None  # MOEJOBS_PEAK_TFLOPS (CUDA only; None: the device table)

    # -- built before the first step (_build, _open_outputs)
    raw: nn.Module = field(init=False)  # the model's parameters live here (not compiled)
    model: nn.Module = field(init=False)  # what training calls: compiled, Fabric-wrapped
    optimizer: Any = field(init=False)  # Fabric-wrapped torch.optim.Optimizer
    config: litgpt.Config = field(init=False)
    attention: AttentionChoice = field(init=False)
    use_router_losses: bool = field(init=False)
    has_router_stats: bool = field(init=False)
    sampler: WindowSampler = field(init=False)
    val_batches: Any = field(init=False)
    metrics: MetricsWriter | None = field(init=False)  # rank 0 only
    router_csv: MetricsWriter | None = field(init=False)  # rank 0, with router stats only
    peak_flops: float | None = field(init=False)
    flops_per_token: float | None = field(init=False)

    # -- progress, all sessions (what a checkpoint records)
    step: int = 0
    samples: int = 0
    tokens: int = 0
    prev_elapsed: float = 0.0  # training seconds of earlier sessions
    last_loss: float | None = None
    last_val: float | None = None
    session_start: float = 0.0  # time.perf_counter() when this session's loop was set up

    @property
    def is_main(self) -> bool:
        return self.fabric.global_rank == 0

    @property
    def world(self) -> int:
        return self.fabric.world_size

    def validate(self) -> float | None:
        """Mean validation loss over this rank's validation batches, averaged over ranks;
        None when there are none."""
        fabric, raw = self.fabric, self.raw
        if not self.val_batches and self.world == 1:
            return None
        raw.eval()
        total = torch.zeros(2, device=fabric.device, dtype=torch.float64)
        # eager: a compiled model would compile a second (inference) graph just for validation
        with (
            torch.no_grad(),
            self.attention.context(),
            fabric.autocast(),
            torch.compiler.set_stance("force_eager"),
        ):
            for batch in self.val_batches:
                total[0] += lm_loss(raw, batch.to(fabric.device)).double()
                total[1] += 1
        raw.train()
        if self.world > 1:
            total = fabric.all_reduce(total, reduce_op="sum")
        return float(total[0] / total[1]) if total[1] > 0 else None

    def emit(self, row: dict) -> None:
        """One metrics.csv row (rank 0; keys of ``contract.METRICS_HEADER``), then ``on_row``."""
        row = {key: row.get(key) for key in contract.METRICS_HEADER}
        if self.metrics is not None:
            with _no_space_names(self.metrics.path):
                self.metrics.write(row)
            if self.on_row is not None:
                self.on_row(row, self.plan)

    def save(self, name: str, meta_extra: dict | None = None) -> Path | None:
        """Write checkpoint ``name`` of the current progress (rank 0; every rank waits for it).
        Returns its folder, None when checkpoints are off."""
        if not self.write_checkpoints:
            return None
        fabric, plan, train, out_dir = self.fabric, self.plan, self.train, self.out_dir
        path = None
        if self.is_main:
            meta = {
                "step": self.step,
                "tokens": self.tokens,
                "samples": self.samples,
                "loss": self.last_loss,
                "val_loss": self.last_val,
                "elapsed_s": self.prev_elapsed + time.perf_counter() - self.session_start,
                "planned_steps": plan.optimizer_steps,
                "world_size": self.world,
                "seq_len": plan.seq_len,
                "micro_batch_size": plan.micro_batch_size,
                "grad_accum_iters": plan.grad_accum_iters,
                "train_config": train.model_dump(mode="json"),
                "model_name": self.config.name,
                "torch": torch.__version__,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **ckpt.resume_record(
                    train, plan, self.data.source, self.data.tokenizer_sha256
                ),  # for the resume checks
                **(meta_extra or {}),
            }
            state = {
                "optimizer": self.optimizer.state_dict(),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                },
            }
            began = time.perf_counter()
            path = ckpt.save_checkpoint(
                out_dir,
                name,
                model_state=self.raw.state_dict(),
                model_config=self.config,
                tokenizer_dir=Path(self.tokenizer_dir),
                state=state,
                meta=meta,
            )
            log.info("checkpoint %s written (step %d)", path, self.step)
            self.reporter.progress.checkpoint = path
            self.reporter.event(
                EventKind.checkpoint_written,
                step=self.step,
                path=str(path),
                name=name,
                write_s=round(time.perf_counter() - began, 3),
            )
        fabric.barrier()
        return path if self.is_main else out_dir / name


def _train_loop(s: _Loop) -> TrainingResult:
    """Train (LitGPT's ``fit``): build the model and optimizer, restore a resumed session,
    open the outputs, then optimizer steps until the plan is done, ``max_time`` passed or a
    signal asked to stop (``Interrupted`` after a checkpoint)."""
    if not s.is_main:
        logging.getLogger("moejobs").setLevel(logging.WARNING)
    s.fabric.seed_everything(s.train.seed, verbose=False)
    _build(s)
    _open_outputs(s)
    return _fit(s)


def _build(s: _Loop) -> None:
    """The model (weights of the resumed checkpoint or ``initial_checkpoint_dir``), attention
    backends, compilation, optimizer, Fabric setup and the resumed progress and RNG states;
    logs the plan and the notes, then the ``model_built`` event."""
    train, model_cfg, plan, fabric = s.train, s.model_cfg, s.plan, s.fabric
    resume_from, device_type = s.resume_from, s.device_type
    t, opt = train.train, train.optimization

    # ---- model
    notes: list[str] = []
    s.use_router_losses = model_cfg.is_moe and (t.moe_aux_loss_coef > 0 or t.moe_z_loss_coef > 0)
    raw = build_model(
        model_cfg,
        seq_len=plan.seq_len,
        moe_implementation=opt.moe_implementation,
        gradient_checkpointing=t.gradient_checkpointing,
        tie_embeddings=bool(t.tie_embeddings),
        router_losses=s.use_router_losses,
        notes=notes,
    )
    s.raw, s.config = raw, raw.config
    if resume_from is not None:
        raw.load_state_dict(ckpt.load_weights(resume_from.path))
        notes.append(
            f"resuming from {resume_from.path} (step {resume_from.step})"
            + (
                f"; initial_checkpoint_dir {train.initial_checkpoint_dir} is not used: the run has its own "
                "checkpoint"
                if train.initial_checkpoint_dir
                else ""
            )
        )
    elif train.initial_checkpoint_dir:
        raw.load_state_dict(ckpt.load_weights(Path(train.initial_checkpoint_dir)))
        notes.append(f"weights initialised from {train.initial_checkpoint_dir}")
    n_params = sum(p.numel() for p in raw.parameters())

    s.attention = choose_backends(
        flash_attention=opt.flash_attention,
        flash_attention_force=opt.flash_attention_force,
        disable_math_fallback=opt.disable_math_fallback,
        device_type=device_type,
    )
    notes.append(f"SDPA backends (priority order): {', '.join(s.attention.names())}")
    notes.extend(s.attention.notes)

    no_cudagraphs = moe_backend_notes(
        raw, fabric.device, expert_dtype(train.precision, device_type), notes
    )
    model = compile_model(raw, opt, device_type, notes, no_cudagraphs=no_cudagraphs)

    optimizer = build_optimizer(train, raw.parameters())
    s.model, s.optimizer = fabric.setup(model, optimizer)
    if train.precision.endswith("-true") and train.precision != "32-true":
        notes.append(
            f"precision {train.precision}: parameters and optimizer state are {train.precision[:-5]} "
            "(no fp32 master weights); use a *-mixed precision for fp32 optimizer state"
        )

    # ---- training state
    if resume_from is not None:
        state = ckpt.load_state(resume_from.path)
        s.optimizer.load_state_dict(state["optimizer"])
        meta = state["meta"]
        s.step, s.samples, s.tokens = int(meta["step"]), int(meta["samples"]), int(meta["tokens"])
        s.prev_elapsed = float(meta.get("elapsed_s", 0.0))
        s.last_loss, s.last_val = meta.get("loss"), meta.get("val_loss")
        rng = state.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "numpy" in rng:
            np.random.set_state(rng["numpy"])
        if "python" in rng:
            random.setstate(rng["python"])
        if (meta.get("seq_len"), meta.get("micro_batch_size")) != (
            plan.seq_len,
            plan.micro_batch_size,
        ):
            notes.append(
                f"resumed checkpoint used seq_len/micro_batch_size {meta.get('seq_len')}/"
                f"{meta.get('micro_batch_size')}, now {plan.seq_len}/{plan.micro_batch_size}"
            )

    if s.is_main:
        log.info(
            "plan: %d optimizer steps x %d micro-batches of %d x %d tokens on %d rank(s); warm-up %d steps; "
            "%d parameters; device %s, precision %s",
            plan.optimizer_steps,
            plan.grad_accum_iters,
            plan.micro_batch_size,
            plan.seq_len,
            plan.world_size,
            plan.warmup_steps,
            n_params,
            fabric.device,
            train.precision,
        )
        for line in notes:
            log.info("%s", line)
    s.reporter.event(
        EventKind.model_built,
        step=s.step,
        plan=dataclasses.asdict(plan),
        parameters=n_params,
        device=str(fabric.device),
        precision=train.precision,
        resumed_from=str(resume_from.path) if resume_from is not None else None,
    )


def _open_outputs(s: _Loop) -> None:
    """The data position (sampler), the validation batches, metrics.csv and router.csv
    (rank 0; rows past a resumed step dropped) and the FLOP figures behind ``mfu`` (CUDA)."""
    train, plan, fabric, data, out_dir = s.train, s.plan, s.fabric, s.data, s.out_dir
    s.sampler = WindowSampler(
        data.train,
        plan.seq_len,
        plan.micro_batch_size,
        train.data.init_args.seed,
        fabric.world_size,
        fabric.global_rank,
        start_sample=s.samples,
    )
    s.val_batches = (
        validation_batches(
            data.val,
            plan.seq_len,
            plan.micro_batch_size,
            train.eval.max_iters,
            fabric.world_size,
            fabric.global_rank,
        )
        if data.val is not None
        else []
    )
    from worker import moe

    s.has_router_stats = any(hasattr(m, "last_token_fraction") for m in moe.moe_layers(s.raw))
    resume_step = s.step if s.resume_from is not None else None
    with _no_space_names(out_dir / contract.METRICS_FILE):
        s.metrics = (
            MetricsWriter(out_dir / contract.METRICS_FILE, resume_step=resume_step)
            if s.is_main
            else None
        )
    with _no_space_names(out_dir / contract.ROUTER_FILE):
        s.router_csv = (
            MetricsWriter(
                out_dir / contract.ROUTER_FILE,
                resume_step=resume_step,
                header=contract.ROUTER_HEADER,
            )
            if s.is_main and s.has_router_stats
            else None
        )

    s.peak_flops = None
    s.flops_per_token = None
    if s.device_type == "cuda":
        override = s.peak_tflops  # MOEJOBS_PEAK_TFLOPS
        s.peak_flops = (
            override * 1e12
            if override
            else contract.peak_flops_per_device(
                torch.cuda.get_device_name(fabric.device), train.precision
            )
        )
        s.flops_per_token = _flops_per_token(train, s.model_cfg)


def _fit(s: _Loop) -> TrainingResult:
    """The optimizer steps (see :func:`_train_loop`), then ``final/``."""
    from worker import moe

    train, plan, fabric, reporter, stop = s.train, s.plan, s.fabric, s.reporter, s.stop
    t, ev = train.train, train.eval
    model, raw, optimizer = s.model, s.raw, s.optimizer
    accum, world = plan.grad_accum_iters, fabric.world_size
    samples_per_step = accum * world * plan.micro_batch_size
    peak_lr, min_lr = train.optimizer.lr, t.min_lr
    max_norm = t.max_norm if t.max_norm else float("inf")
    s.session_start = time.perf_counter()
    train_seconds = 0.0
    row_tokens = s.tokens
    first_step = s.step

    model.train()
    with s.attention.context():
        if ev.initial_validation and s.resume_from is None and s.data.val is not None:
            s.last_val = s.validate()
            s.emit(
                {
                    "step": 0,
                    "tokens": 0,
                    "elapsed_s": time.perf_counter() - s.session_start + s.prev_elapsed,
                    "val_loss": s.last_val,
                    "val_ppl": _ppl(s.last_val),
                }
            )

        stopped_by = "completed"
        k = 0  # micro-batches of this rank in this session
        stop.arm()  # from here a signal stops the run at a step boundary (before: nothing trained)
        reporter.progress.training_started = True
        while s.step < plan.optimizer_steps:
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=fabric.device, dtype=torch.float32)
            for i in range(accum):
                batch = s.sampler.batch(k).to(fabric.device, non_blocking=True)
                k += 1
                sync = (
                    nullcontext()
                    if world == 1
                    else fabric.no_backward_sync(model, enabled=i < accum - 1)
                )
                with sync:
                    loss = lm_loss(model, batch)
                    total = loss
                    if s.use_router_losses:
                        aux, z = moe.collect_aux_losses(
                            raw
                        )  # of this forward; read before backward recomputes
                        total = loss + t.moe_aux_loss_coef * aux + t.moe_z_loss_coef * z
                    fabric.backward(total / accum)
                loss_sum += loss.detach().float()
            s.step += 1
            step = s.step
            lr = plan.learning_rate(step, peak_lr, min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            grad_norm = fabric.clip_gradients(model, optimizer, max_norm=max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            s.samples += samples_per_step
            s.tokens += samples_per_step * plan.seq_len
            step_loss = loss_sum / accum
            if world > 1 and (step % t.log_interval == 0 or step == plan.optimizer_steps):
                step_loss = fabric.all_reduce(step_loss, reduce_op="mean")
            s.last_loss = float(step_loss)  # also synchronises, so the step time below is real
            train_seconds += time.perf_counter() - t0
            progress = reporter.progress
            progress.steps, progress.tokens, progress.final_loss = step, s.tokens, s.last_loss
            if step == first_step + 1:
                reporter.event(
                    EventKind.first_step,
                    step=step,
                    loss=s.last_loss,
                    seconds=round(time.perf_counter() - s.session_start, 3),
                )

            # stop requests agreed by all ranks: SIGTERM/SIGINT, max_time (this session's wall time)
            flags = torch.tensor(
                [
                    stop.signal is not None,
                    t.max_time is not None and time.perf_counter() - s.session_start >= t.max_time,
                ],
                dtype=torch.float32,
                device=fabric.device,
            )
            if world > 1:
                flags = fabric.all_reduce(flags, reduce_op="sum")
            interrupted, timed_out = bool(flags[0] > 0), bool(flags[1] > 0)
            last = step >= plan.optimizer_steps or interrupted or timed_out

            if s.has_router_stats and (step % t.log_interval == 0 or last):
                # the step's last training forward; read before validation runs another one
                fractions = torch.stack(moe.collect_router_stats(raw)).float()
                if world > 1:
                    fractions = fabric.all_reduce(fractions, reduce_op="mean")
                if s.router_csv is not None:
                    with _no_space_names(s.router_csv.path):
                        s.router_csv.write_many(
                            [
                                {"step": step, "layer": layer, "expert": expert, "fraction": value}
                                for layer, row in enumerate(fractions.tolist())
                                for expert, value in enumerate(row)
                            ]
                        )

            val = None
            if (ev.interval and step % ev.interval == 0) or (
                last and not interrupted and ev.final_validation
            ):
                val = s.validate()
                if val is not None:
                    s.last_val = reporter.progress.val_loss = val
            if step % t.log_interval == 0 or val is not None or last:
                elapsed = s.prev_elapsed + time.perf_counter() - s.session_start
                tps = (s.tokens - row_tokens) / train_seconds if train_seconds > 0 else None
                row = {
                    "step": step,
                    "tokens": s.tokens,
                    "loss": s.last_loss,
                    "learning_rate": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_sec": tps,
                    "mfu": (
                        model_flops_utilization(tps, s.flops_per_token, s.peak_flops, world)
                        if tps and s.flops_per_token
                        else None
                    ),
                    "elapsed_s": elapsed,
                    "val_loss": val,
                    "val_ppl": _ppl(val),
                }
                s.emit(row)
                row_tokens, train_seconds = s.tokens, 0.0
            if interrupted:
                path = s.save(ckpt.step_dir_name(step))
                name = signal.Signals(stop.signal).name if stop.signal else None
                raise Interrupted(
                    f"stopped by {name or 'a signal on another rank'} after optimizer step {step}; "
                    + (
                        f"checkpoint {path}; run again with resume: auto to continue"
                        if path
                        else "checkpoints are off, nothing to resume from"
                    ),
                    signal_name=name,
                    checkpoint=path,
                )
            if t.save_interval and step % t.save_interval == 0:
                s.save(ckpt.step_dir_name(step))
            if timed_out and step < plan.optimizer_steps:
                log.warning(
                    "train.max_time %.0f s reached after step %d of %d: stopping",
                    t.max_time,
                    step,
                    plan.optimizer_steps,
                )
                stopped_by = "max_time"
                break

        final = s.save(ckpt.FINAL)
    if s.metrics is not None:
        s.metrics.close()
    if s.router_csv is not None:
        s.router_csv.close()
    if s.is_main:
        log.info(
            "done: %d steps (%d this session), %d tokens, loss %s, val_loss %s",
            s.step,
            s.step - first_step,
            s.tokens,
            s.last_loss,
            s.last_val,
        )
    return TrainingResult(
        steps=s.step,
        tokens=s.tokens,
        final_loss=s.last_loss,
        val_loss=s.last_val,
        checkpoint_dir=final,
        peak_memory_bytes=_peak_memory(fabric.device),
        elapsed_s=time.perf_counter() - s.started,
        out_dir=s.out_dir,
        stopped_by=stopped_by,
    )


# --------------------------------------------------------------------------------------------------
# Pre-flight and resume
# --------------------------------------------------------------------------------------------------


def preflight(
    train: TrainConfig,
    *,
    cuda_available: bool | None = None,
    cuda_device_count: int | None = None,
    bf16_supported: bool | None = None,
) -> None:
    """Check that this machine can run ``train`` before any data or model work.

    The keyword arguments override what is detected (tests use them to describe other machines).

    Raises:
        PreflightError: naming the field: ``optimization.flash_attention_force`` on a CPU or with
            ``32-true``; ``precision`` bf16-* on a CUDA GPU without bf16; ``devices`` (x
            ``num_nodes``) beyond the visible GPUs; ``num_nodes`` > 1 without a cluster launcher.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if cuda_device_count is None:
        cuda_device_count = torch.cuda.device_count() if cuda_available else 0
    opt = train.optimization
    if opt.flash_attention_force:
        if not cuda_available:
            raise PreflightError(
                "optimization.flash_attention_force: flash-attention kernels need a CUDA GPU and this "
                "machine has none; set flash_attention_force: false (flash_attention: true still prefers "
                "PyTorch's CPU flash kernel)"
            )
        if train.precision == "32-true":
            raise PreflightError(
                "optimization.flash_attention_force: flash-attention kernels need fp16/bf16 inputs but "
                "precision is 32-true; use bf16-mixed or set flash_attention_force: false"
            )
    if cuda_available and train.precision.startswith("bf16"):
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        if not bf16_supported:
            raise PreflightError(
                f"precision: {train.precision} needs a GPU with bfloat16 support (Ampere or newer); "
                "this GPU has none: use 16-mixed or 32-true"
            )
    devices = train.devices
    if cuda_available and devices != "auto" and int(devices) > cuda_device_count:
        raise PreflightError(
            f"devices: {devices} GPUs requested but this machine has {cuda_device_count} visible"
        )
    if train.num_nodes > 1 and not externally_launched() and "SLURM_PROCID" not in os.environ:
        raise PreflightError(
            f"num_nodes: {train.num_nodes} nodes need a cluster launcher (SLURM or torchrun) that sets "
            "the rank environment on every node"
        )


def lightning_precision(
    precision: _Precision, device_type: str
) -> tuple[_Precision | Literal["bf16-mixed"], str | None]:
    """The Fabric precision to use and a note for the log when it differs from the config.

    16-mixed on a CPU runs as bf16 autocast (what Lightning 2.6 does silently; made explicit here).
    """
    if device_type == "cpu" and precision == "16-mixed":
        return (
            "bf16-mixed",
            "precision 16-mixed on CPU runs as bf16-mixed (CPU autocast has no fp16 GradScaler path)",
        )
    return precision, None


def _resolve_resume(train: TrainConfig, out_dir: Path) -> ckpt.CheckpointInfo | None:
    resume = train.resume
    if resume is False:
        existing = ckpt.list_checkpoints(out_dir)
        if existing:
            raise PreflightError(
                f"resume: false but out_dir {out_dir} already holds checkpoints "
                f"({', '.join(c.path.name for c in existing[-3:])}); set resume: auto to continue that run, "
                "or choose another out_dir"
            )
        return None
    if resume is True or resume == "auto":
        latest = ckpt.latest_loadable_checkpoint(out_dir, warn=log.warning)
        if latest is None and resume is True:
            raise PreflightError(f"resume: true but out_dir {out_dir} holds no complete checkpoint")
        return latest
    info = ckpt.read_checkpoint(Path(resume))
    if info is None:
        raise PreflightError(
            f"resume: {resume} is not a complete checkpoint folder (needs {', '.join(ckpt.REQUIRED)})"
        )
    ckpt.require_loadable(info.path)
    return info


def _check_resume(
    train: TrainConfig,
    plan: TrainingPlan,
    resume_from: ckpt.CheckpointInfo,
    current: dict,
    log_warnings: bool,
) -> None:
    """Refuse to resume a checkpoint of a different run (``worker.checkpoint.check_resume``);
    log the accepted differences and a changed run length as warnings when ``log_warnings``.

    Raises:
        PreflightError: naming ``resume``, every refused difference (old -> new) and the
            ``resume_allow_changes`` entries that would accept them.
    """
    result = ckpt.check_resume(
        resume_from, current, train=train, plan=plan, allow=train.resume_allow_changes
    )
    message = result.refusal(resume_from.path)
    if message:
        raise PreflightError(message)
    if log_warnings:
        for line in result.warnings:
            log.warning("%s", line)


# --------------------------------------------------------------------------------------------------
# Model, loss and optimizer
# --------------------------------------------------------------------------------------------------


def build_model(
    model: ModelConfig,
    *,
    seq_len: int,
    moe_implementation: str = "loop",
    gradient_checkpointing: bool = False,
    tie_embeddings: bool = False,
    router_losses: bool = False,
    notes: list[str] | None = None,
) -> litgpt.GPT:
    """The training model on the CPU in fp32, initialised with :func:`init_weights` from the
    current torch RNG state (seed it first).

    Args:
        seq_len: training sequence length; sets ``max_seq_length`` (RoPE cache size).
        moe_implementation: "grouped" swaps LitGPT's ``LLaMAMoE`` layers for
            ``worker.moe.GroupedMoE`` (same weights and state-dict keys) when that module exists;
            "loop" keeps LitGPT's layers.
        gradient_checkpointing: wrap each block's forward in activation checkpointing.
        tie_embeddings: share ``transformer.wte.weight`` with ``lm_head.weight``.
        router_losses: make every MoE layer compute the load-balancing and z losses of its
            forward (read with ``worker.moe.collect_aux_losses``).
        notes: lines for the log are appended here.

    Raises:
        PreflightError: ``router_losses`` requested but ``worker.moe`` is not importable.
    """
    import litgpt

    notes = notes if notes is not None else []
    config = litgpt_config(model)
    with torch.device("meta"):  # no memory and no default init: init_weights sets every value once
        gpt = litgpt.GPT(config)
        gpt.max_seq_length = seq_len
    gpt.to_empty(device="cpu")
    init_weights(gpt, config)
    if tie_embeddings:
        gpt.lm_head.weight = gpt.transformer.wte.weight
        notes.append("tie_embeddings: lm_head shares the token-embedding matrix")
    if config.mlp_class_name == "LLaMAMoE":
        have_moe = True
        try:
            from worker import moe
        except ImportError as exc:
            have_moe = False
            if router_losses:
                raise PreflightError(
                    f"train.moe_aux_loss_coef/moe_z_loss_coef: need worker.moe ({exc})"
                ) from None
            notes.append(f"worker.moe not importable ({exc}): LitGPT's per-expert LLaMAMoE loop")
        if have_moe and moe_implementation == "grouped":
            n = moe.swap_moe_layers(gpt, router_losses=router_losses)
            notes.append(
                f"moe_implementation grouped: {n} LLaMAMoE layers replaced by worker.moe.GroupedMoE"
            )
        elif have_moe:
            notes.append("moe_implementation loop: LitGPT's per-expert LLaMAMoE loop")
            moe.attach_router_telemetry(gpt, router_losses=router_losses)  # router.csv for both
        if router_losses:
            notes.append("MoE router losses on (load balancing, z-loss; worker.moe.router_losses)")
    from worker.gqa import use_gqa_attention

    n_gqa = use_gqa_attention(gpt)
    notes.append(
        f"attention: SDPA with enable_gqa (no repeated K/V) in {n_gqa} grouped-query layers"
        if n_gqa
        else "attention: SDPA (multi-head; no grouped-query layers)"
    )
    if gradient_checkpointing:
        n = _checkpoint_block_forwards(gpt)
        notes.append(f"gradient_checkpointing: activation checkpointing of {n} transformer blocks")
    return gpt


def litgpt_config(model: ModelConfig) -> litgpt.Config:
    """``litgpt.Config`` of a validated model config."""
    import litgpt

    return litgpt.Config(**model.litgpt_kwargs())


def init_weights(model: nn.Module, config: litgpt.Config) -> None:
    """GPT-NeoX initialisation (Black et al. 2022, "GPT-NeoX-20B", sec. 3.1.1; Lightning's
    pretraining recipes use it too): every Linear and Embedding weight ~ N(0, sqrt(2 / (5 d)))
    ("small init", Nguyen & Salazar 2019), and the residual-branch output projections (attention
    ``proj`` and every MLP/expert ``proj``) ~ N(0, 2 / (n_layer * sqrt(d))) ("wang init");
    biases zero; every other module with a ``reset_parameters`` (norms: weight 1; ``GPT``: the
    RoPE cache) is reset. ``d`` = n_embd. Works on a model materialised with ``to_empty``."""
    import litgpt.model as lm

    d, n_layer = config.n_embd, config.n_layer
    small, wang = math.sqrt(2.0 / (5 * d)), 2.0 / (n_layer * math.sqrt(d))
    with torch.no_grad():
        for mod in model.modules():
            reset = getattr(mod, "reset_parameters", None)
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, mean=0.0, std=small)
                bias = getattr(mod, "bias", None)  # nn.Embedding has none
                if bias is not None:
                    nn.init.zeros_(bias)
            elif callable(reset):
                reset()
        for mod in model.modules():
            if isinstance(mod, (lm.CausalSelfAttention, lm.LLaMAMLP, lm.GptNeoxMLP)):
                nn.init.normal_(mod.proj.weight, mean=0.0, std=wang)


def _checkpoint_block_forwards(model: litgpt.GPT) -> int:
    """Activation checkpointing of every transformer block: each ``Block.forward`` runs under
    ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` when gradients are on, so its
    activations are recomputed in the backward pass. The forward is replaced on the instance,
    so module names and state-dict keys stay LitGPT's. Returns the number of blocks wrapped."""

    def wrapped(*args, _forward, **kwargs):
        if torch.is_grad_enabled():
            return activation_checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        return _forward(*args, **kwargs)

    n = 0
    for block in model.transformer.h:
        block.forward = partial(wrapped, _forward=block.forward)
        n += 1
    return n


def expert_dtype(precision: str, device_type: str) -> torch.dtype:
    """The dtype the MoE expert matmuls run in under ``precision`` (the autocast dtype for *-mixed)."""
    effective, _ = lightning_precision(precision, device_type)
    if effective.startswith("bf16"):
        return torch.bfloat16
    if effective.startswith("16"):
        return torch.float16
    return torch.float64 if effective.startswith("64") else torch.float32


def moe_backend_notes(raw: nn.Module, device, dtype: torch.dtype, notes: list[str]) -> str | None:
    """Log line for the MoE expert backend(s) of ``raw`` on ``device`` (``worker.moe.select_backend``).

    Returns the reason CUDA graphs must stay off (a backend that reads the group offsets on the
    host), or None.
    """
    try:
        from worker import moe
    except ImportError:
        return None
    found = moe.model_backends(raw, device, dtype)
    if not found:
        return None
    capability = moe.device_capability(device)
    where = f"{torch.device(device).type}" + (
        f" sm{capability[0]}{capability[1]}" if capability else ""
    )
    listed = ", ".join(
        f"{name} ({n} layer{'s' if n != 1 else ''})" for name, n in sorted(found.items())
    )
    notes.append(f"MoE expert backend on {where}, {str(dtype).removeprefix('torch.')}: {listed}")
    if "dense" in found:
        notes.append(
            "MoE backend dense computes every expert on every token (n_expert / k x the expert FLOPs): "
            "the widths are not 16-byte aligned, or the device is neither CPU nor CUDA"
        )
    sync = sorted(set(found) & moe.HOST_SYNC_BACKENDS)
    if sync:
        return (
            f"MoE backend {sync[0]} reads the expert offsets on the host once per layer (no fast grouped GEMM "
            f"for {str(dtype).removeprefix('torch.')} on {where})"
        )
    return None


def effective_compile_mode(
    compile_mode: str, device_type: str, no_cudagraphs: str | None
) -> tuple[str | None, str | None]:
    """``torch.compile``'s ``mode`` for ``optimization.compile_mode`` (``"default"`` -> None) and a log
    line when it had to change: on CUDA with a ``no_cudagraphs`` reason, ``reduce-overhead`` becomes
    ``default`` and ``max-autotune`` becomes ``max-autotune-no-cudagraphs``."""
    mode = None if compile_mode == "default" else compile_mode
    if (
        device_type != "cuda"
        or not no_cudagraphs
        or mode not in ("reduce-overhead", "max-autotune")
    ):
        return mode, None
    new_mode = None if mode == "reduce-overhead" else "max-autotune-no-cudagraphs"
    return new_mode, (
        f"compile_mode {mode} -> {new_mode or 'default'} (CUDA graphs off): {no_cudagraphs}, "
        "which a CUDA graph cannot capture"
    )


def compile_model(
    raw: litgpt.GPT, opt, device_type: str, notes: list[str], no_cudagraphs: str | None = None
) -> nn.Module:
    """Apply ``optimization.compile*`` to the model built by :func:`build_model`.

    ``torch.compile(mode=..., dynamic=..., fullgraph=...)`` with ``compile_mode: default`` passed
    as ``mode=None``. On CUDA the whole model is compiled. On a CPU each transformer ``Block`` is
    compiled instead ("regional compilation", PyTorch's recipe against cold-start compile time):
    the blocks share one code object, so one block's graph is traced, lowered and built with the
    C++ compiler once and reused by all ``n_layer`` blocks, while a whole-model compile traces
    and lowers every layer. Inductor builds each CPU kernel with ``g++ -O3`` (about 20 kernels per
    block's forward+backward, seconds each on a small CPU), which is what makes a cold CPU compile
    slow; the result is cached on disk (``TORCHINDUCTOR_CACHE_DIR``), so later runs start fast.
    The embedding, final norm, LM head and loss stay eager on the CPU. Returns the module to call.

    ``no_cudagraphs``: a reason CUDA graphs cannot capture the model (from :func:`moe_backend_notes`);
    on CUDA ``reduce-overhead`` then compiles as ``default`` and ``max-autotune`` as
    ``max-autotune-no-cudagraphs``, with a warning that names the reason.
    """
    if not opt.compile:
        notes.append("torch.compile off")
        return raw
    mode, line = effective_compile_mode(opt.compile_mode, device_type, no_cudagraphs)
    if line:
        notes.append(line)
    kwargs = {"mode": mode, "dynamic": opt.compile_dynamic, "fullgraph": opt.compile_fullgraph}
    desc = f"mode={mode}, dynamic={opt.compile_dynamic}, fullgraph={opt.compile_fullgraph}"
    if device_type == "cuda":
        notes.append(f"torch.compile({desc}) of the whole model")
        # an OptimizedModule: torch types what compile returns as a plain callable
        return cast(nn.Module, torch.compile(raw, **kwargs))
    if (os.cpu_count() or 1) <= 4 and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # Inductor's default builds kernels in a pool of cpu_count worker processes; on a small
        # machine starting them (each imports torch) costs more than the parallelism gains.
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
        notes.append(
            "inductor compile_threads=1 on this small CPU (set TORCHINDUCTOR_COMPILE_THREADS to override)"
        )
    for block in raw.transformer.h:
        block.compile(**kwargs)
    notes.append(
        f"torch.compile({desc}) per transformer block (CPU: regional compilation, one block's kernels "
        "built once and reused by every layer; embedding, LM head and loss run eagerly)"
        + (
            "; reduce-overhead/max-autotune CUDA graphs do not apply on a CPU"
            if mode in ("reduce-overhead", "max-autotune")
            else ""
        )
    )
    return raw


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``batch`` (int64, shape ``(B, T + 1)``): inputs ``batch[:, :-1]``,
    targets ``batch[:, 1:]``, mean over the ``B * T`` positions (``litgpt.utils.chunked_cross_entropy``,
    as LitGPT's pretraining computes it). Returns a 0-dim tensor."""
    from litgpt.utils import chunked_cross_entropy

    logits = model(batch[:, :-1])
    return chunked_cross_entropy(logits, batch[:, 1:])


def build_optimizer(train: TrainConfig, params) -> torch.optim.Optimizer:
    """The optimizer of ``train.optimizer`` (allowlisted class, nothing imported by name).

    Adam/AdamW use PyTorch's fused implementation (one kernel per step on CPU and CUDA, no
    full-size temporaries: the foreach default allocates several GB of them for MoE-200M). The
    state has the parameters' dtype: fp32 under 32-true and *-mixed (fp32 master weights).
    """
    cls = _OPTIMIZERS[train.optimizer.class_path]
    kwargs = dict(train.optimizer.torch_kwargs())
    if "betas" in kwargs and kwargs["betas"] is not None:
        kwargs["betas"] = tuple(kwargs["betas"])
    if cls in (torch.optim.Adam, torch.optim.AdamW):
        kwargs["fused"] = True
    return cls(params, **kwargs)


# --------------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------------


class StopFlag:
    """SIGTERM/SIGINT set a flag that the loop checks at each optimizer-step boundary.

    A second SIGINT more than :attr:`SAME_INTERRUPT_SECONDS` after the first raises
    KeyboardInterrupt at once (the usual double Ctrl-C: abort without a checkpoint). One
    within that window is the same Ctrl-C delivered twice and is ignored: the terminal sends
    SIGINT to the whole foreground process group and ``uv run`` forwards it to its child once
    more, so ``uv run python run_train.py`` receives two SIGINTs for one Ctrl-C.

    Before training starts: where ``worker.early``'s handlers are installed (they end the
    process at once with one line and 130/143), :meth:`install` leaves them in place and
    :meth:`arm` replaces them when the first optimizer step begins; elsewhere (``run_training``
    called in-process) the flag is set from :meth:`install` on and :meth:`arm` raises
    ``Interrupted`` (before training started) when it is.

    Args:
        on_signal: called with the signal number from the handler (the ``stop_requested``
            event); must not raise.
    """

    #: A repeated SIGINT within this many seconds of the first signal counts as the same one.
    SAME_INTERRUPT_SECONDS = 1.0

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.signal: int | None = None
        self._received_at: float | None = None
        self._previous: dict[int, Any] = {}
        self._deferred: list[int] = []
        self._on_signal = on_signal

    def _handler(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signal is not None and signum == signal.SIGINT:
            if now - (self._received_at or now) < self.SAME_INTERRUPT_SECONDS:
                return  # the same Ctrl-C, delivered twice
            raise KeyboardInterrupt("second SIGINT: aborted without writing a checkpoint")
        self.signal = signum
        if self._received_at is None:
            self._received_at = now
        log.warning(
            "received %s: stopping at the next optimizer-step boundary", signal.Signals(signum).name
        )
        if self._on_signal is not None:
            self._on_signal(signum)

    def install(self) -> None:
        """Install the SIGTERM/SIGINT handlers (main thread only; elsewhere logs and does
        nothing); ``worker.early``'s handlers stay until :meth:`arm`."""
        if threading.current_thread() is not threading.main_thread():
            log.info("not in the main thread: SIGTERM/SIGINT handlers not installed")
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            if early.is_early_handler(signal.getsignal(sig)):
                self._deferred.append(sig)
            else:
                self._previous[sig] = signal.signal(sig, self._handler)

    def arm(self) -> None:
        """The first optimizer step begins: install the handlers :meth:`install` deferred.

        Raises:
            Interrupted: a signal was received since :meth:`install` (before training started;
                exit code 128 + the signal, nothing trained).
        """
        for sig in self._deferred:
            self._previous[sig] = signal.signal(sig, self._handler)
        self._deferred.clear()
        if self.signal is not None:
            raise errors.interrupted_before_start(self.signal, signal.Signals(self.signal).name)

    def restore(self) -> None:
        """Put back the handlers that :meth:`install` replaced. Within
        :attr:`SAME_INTERRUPT_SECONDS` of a signal, first waits out the rest of that window
        (under this flag's handler): a step boundary can come sooner than the repeat of the
        same Ctrl-C, which Python's default handler would turn into a KeyboardInterrupt.
        ``worker.early``'s handlers are not put back: the run has ended and is being
        reported, so a signal from now on is ignored (its "before training started" would be
        false)."""
        ignored = {
            sig for sig, handler in self._previous.items() if early.is_early_handler(handler)
        }
        if self._previous and self._received_at is not None and len(ignored) < len(self._previous):
            remaining = self._received_at + self.SAME_INTERRUPT_SECONDS - time.monotonic()
            if remaining > 0:
                time.sleep(remaining)
        for sig in self._deferred:  # never armed: the run ended before its first step
            ignored.add(sig)
            self._previous[sig] = signal.SIG_IGN
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if sig in ignored else handler)
        self._previous.clear()
        self._deferred.clear()


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


@contextmanager
def _run_log(out_dir: Path, enabled: bool) -> Iterator[None]:
    """Append this run's log lines to ``out_dir/train.log`` (rank 0)."""
    if not enabled:
        yield
        return
    with _no_space_names(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    with _no_space_names(out_dir / "train.log"):
        handler = _RunLogHandler(out_dir / "train.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("moejobs")
    previous = logger.level
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
        handler.close()


class _RunLogHandler(logging.FileHandler):
    """``train.log``: a line that cannot be written (a full disk) is reported once on stderr
    instead of a traceback per line, and the file is left alone from then on; the run goes on
    (metrics.csv and checkpoints report their own failures)."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # flushing the unwritten tail of a failed file: already reported
            pass

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            exc = sys.exc_info()[1]
            try:
                sys.stderr.write(
                    f"warning: cannot write {self.baseFilename} ({exc}); train.log stops here\n"
                )
            except (OSError, ValueError):
                pass


@contextmanager
def _no_space_names(path: Path) -> Iterator[None]:
    """Turn an ENOSPC ``OSError`` raised inside the block (which names no file when it comes
    from a flush) into :class:`~worker.errors.NoSpace` naming ``path`` and its free space."""
    try:
        yield
    except OSError as exc:
        if errors.no_space_errno(exc) is None:
            raise
        raise errors.no_space(path) from exc


def _progress_from(reporter: Reporter, info: ckpt.CheckpointInfo) -> None:
    """Start the reporter's progress at the checkpoint being resumed (earlier attempts' work)."""
    meta, p = info.meta, reporter.progress
    p.steps = info.step
    try:
        p.tokens = int(meta.get("tokens", 0))
    except (TypeError, ValueError):
        p.tokens = 0
    p.final_loss, p.val_loss = meta.get("loss"), meta.get("val_loss")


def _ppl(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(min(loss, 700.0))


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _peak_tflops(settings: Settings | None, device_type: str) -> float | None:
    """``peak_tflops`` (MOEJOBS_PEAK_TFLOPS) of ``settings``, else of the process's settings, on
    a CUDA device; None elsewhere (the settings are not read then)."""
    if device_type != "cuda":
        return None
    return (settings or get_settings()).peak_tflops


def _flops_per_token(train: TrainConfig, model: ModelConfig) -> float | None:
    """Training FLOPs per token from ``service.estimate`` (None if it does not provide them)."""
    try:
        value = getattr(estimate(train, model), "flops_per_token", None)
        return float(value) if value else None
    except Exception:  # the estimate is informational here; MFU stays empty
        return None


if __name__ == "__main__":
    sys.exit(main())
