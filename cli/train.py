"""``moejobs train`` (``run_train.py``), ``moejobs validate`` and ``moejobs schema``: local
training from the YAML configs (the source specification's command line) and the config tools.

``run_train.py`` and ``moejobs train`` both call :func:`main`, after installing the early signal
handlers (``worker.entry``); ``moejobs validate`` is ``main`` with ``--dry-run``. Precedence of settings, lowest
first: the two config files < ``--preset`` < ``--smoke-test`` < explicit flags.

Exit codes (``service.contract.ExitCode``): 0 success, 2 invalid config (the message names the
field), 1 training failure (one line ``error: <reason>: ...``; reasons
invalid_data, out_of_memory, no_space, crashed), 75 interrupted by SIGTERM/SIGINT after writing a
resumable checkpoint (run the same command again to resume), 130/143 SIGINT/SIGTERM before the
first optimizer step (one line, nothing trained), 130 also for a second Ctrl-C during training
(no checkpoint). ``--dry-run`` (and ``moejobs validate``) checks what the API's
``/runs/validate`` checks (``service.checks.check_run``, paths from the current folder) plus the
device pre-flight, and exits as the real run would fail: 2 for an invalid config, a failed
pre-flight or a ``resume`` path that is no checkpoint, 1 for a missing or unusable data folder,
tokenizer folder or ``initial_checkpoint_dir`` (``error: invalid_data: FIELD: ...``), else 0.

Every end of a training (not ``--dry-run``) is also written to ``out_dir/result.json``
(``service.contract.EngineResult``); for an invalid config, ``out_dir`` is the one the flags or
the raw config file name, else the working directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.contract import METRICS_FILE
from service.resources import project_path

REPO_CONFIGS = project_path("configs")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"true", "1", "yes", "on"}:
        return True
    if value in {"false", "0", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _devices(text: str) -> int | str:
    return "auto" if text == "auto" else int(text)


def build_parser(prog: str = "run_train.py") -> argparse.ArgumentParser:
    """The argument parser; every override flag maps to one config key (see ``FLAG_KEYS``)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a LitGPT Mixture-of-Experts model from YAML configs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config",
        default=str(REPO_CONFIGS / "train_config.yaml"),
        help="training config (YAML or JSON)",
    )
    p.add_argument(
        "--model-config",
        default=str(REPO_CONFIGS / "model_config.yaml"),
        help="model config (YAML or JSON)",
    )
    p.add_argument(
        "--preset",
        help="preset name under configs/presets/ (e.g. cpu-tiny, production) or a preset file",
    )
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help="the spec's smoke test: 1 step of 64 tokens, 32-true, no checkpoint",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print warnings and the estimate, train nothing",
    )
    g = p.add_argument_group("overrides (win over files, preset and --smoke-test)")
    g.add_argument("--out-dir")
    g.add_argument("--train-data-path")
    g.add_argument("--val-data-path")
    g.add_argument("--tokenizer-dir")
    g.add_argument("--micro-batch-size", type=int)
    g.add_argument("--global-batch-size", type=int)
    g.add_argument("--max-tokens", type=int)
    g.add_argument("--max-seq-length", type=int)
    g.add_argument("--precision")
    g.add_argument("--devices", type=_devices)
    g.add_argument("--seed", type=int)
    g.add_argument("--resume", help="auto, false, or a checkpoint folder")
    g.add_argument(
        "--resume-allow-changes",
        metavar="KIND[,KIND]",
        help="differences from the checkpoint a resume accepts: data, tokenizer, schedule, batch, seq_len",
    )
    g.add_argument("--compile", type=_bool, metavar="true|false")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    return p


#: flag dest -> path of the key it sets in the training config
FLAG_KEYS: dict[str, tuple[str, ...]] = {
    "out_dir": ("out_dir",),
    "train_data_path": ("data", "init_args", "train_data_path"),
    "val_data_path": ("data", "init_args", "val_data_path"),
    "tokenizer_dir": ("tokenizer_dir",),
    "micro_batch_size": ("train", "micro_batch_size"),
    "global_batch_size": ("train", "global_batch_size"),
    "max_tokens": ("train", "max_tokens"),
    "max_seq_length": ("train", "max_seq_length"),
    "precision": ("precision",),
    "devices": ("devices",),
    "seed": ("seed",),
    "resume": ("resume",),
    "resume_allow_changes": ("resume_allow_changes",),
    "compile": ("optimization", "compile"),
    "gradient_checkpointing": ("train", "gradient_checkpointing"),
}


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Nested training-config overrides from the flags that were given."""
    out: dict[str, Any] = {}
    for dest, path in FLAG_KEYS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if dest == "resume":
            value = {"false": False, "true": True}.get(value.lower(), value)
        elif dest == "resume_allow_changes":
            value = [part.strip() for part in value.split(",") if part.strip()]
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _say(*lines: str, file=None) -> None:
    """Print ``lines`` to ``file`` (default: the ``sys.stdout`` of the moment of the call, not
    of the import: a test harness or a caller may have replaced it since)."""
    for line in lines:
        print(line, file=file if file is not None else sys.stdout, flush=True)


def main(argv: list[str] | None = None, prog: str = "run_train.py") -> int:
    """Parse ``argv``, validate, and train (or only report with ``--dry-run``). Returns the exit
    code (see the module docstring). Ctrl-C before the engine's signal handlers are installed
    (imports, config checks) prints ``interrupted before training started`` and returns 130; a
    second Ctrl-C during training (later than ``StopFlag.SAME_INTERRUPT_SECONDS`` after the
    first) aborts without a checkpoint, one line, 130. Raises SystemExit for argparse errors."""
    try:
        return _main(argv, prog)
    except KeyboardInterrupt as exc:  # one line, never a traceback
        # the engine's double Ctrl-C says why; Python's default handler says nothing
        _say(
            f"interrupted: {exc.args[0]}" if exc.args else "interrupted before training started",
            file=sys.stderr,
        )
        return 130


def _invalid_config_out_dir(args: argparse.Namespace) -> str:
    """Where to report an invalid config: ``--out-dir``, else the raw config file's out_dir,
    else the working directory (``worker.reporting.raw_out_dir``)."""
    from worker.reporting import raw_out_dir

    return args.out_dir or raw_out_dir(args.config)


def _main(argv: list[str] | None, prog: str) -> int:
    args = build_parser(prog).parse_args(argv)

    from service.checks import LocalPaths, check_run
    from service.config.issues import ConfigError
    from service.config.merge import resolve_documents
    from service.report import format_estimate, format_issues

    try:
        train, model = resolve_documents(
            args.config,
            args.model_config,
            preset=args.preset,
            smoke_test=args.smoke_test,
            train_overrides=train_overrides(args),
        )
        # the API's /runs/validate makes the same checks (paths under DATA_ROOT there)
        checked = check_run(train, model, LocalPaths(Path.cwd()))
    except ConfigError as exc:
        issues = format_issues(exc.errors)
        _say("error: invalid config", *issues, file=sys.stderr)
        if not args.dry_run:
            from worker.errors import PreflightError
            from worker.reporting import Reporter

            Reporter(_invalid_config_out_dir(args)).failed(
                PreflightError(
                    "invalid config: " + "; ".join(line.strip() for line in issues if line.strip())
                )
            )
        return 2
    validated = checked.validated
    if checked.warnings:
        _say("warnings:", *format_issues(checked.warnings), file=sys.stderr)
    if args.dry_run:
        from service.estimate import estimate

        _say(
            *format_estimate(
                estimate(
                    validated.train,
                    validated.model,
                    device_kind=_local_device_kind(),
                    plan=validated.plan,
                )
            )
        )
        for problem in checked.errors:  # unusable inputs, as the engine would name them
            _say(f"error: {problem.reason.value}: {problem.issue}", file=sys.stderr)
        device = _dry_run_preflight(validated)
        # the engine runs the device pre-flight first, then meets the inputs in this order
        return device or (checked.errors[0].exit_code if checked.errors else 0)
    return _train(validated, smoke_test=args.smoke_test)


def _local_device_kind() -> str:
    """ "cuda" when this machine would train on a GPU, else "cpu" (also without torch): the device
    kind ``--dry-run``'s ``memory.total`` is for (``memory.total_cpu``/``total_cuda`` show both)."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dry_run_preflight(validated) -> int:
    """The engine's device pre-flight (``worker.train.preflight``) for ``--dry-run``, so a
    config this machine cannot run fails the dry run with the same line and exit code as the
    real run. Skipped, with a note, on an install without torch."""
    from worker.errors import EngineError

    try:
        from worker.train import preflight
    except ImportError as exc:
        _say(
            f"note: device pre-flight skipped: training needs the 'train' extra ({exc})",
            file=sys.stderr,
        )
        return 0
    try:
        preflight(validated.train)
    except EngineError as exc:
        _say(f"error: {exc.label}: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    return 0


def _train(validated, smoke_test: bool) -> int:
    from service.contract import FailureReason
    from worker import errors
    from worker.progress import ProgressBar
    from worker.reporting import Reporter

    reporter = Reporter(validated.train.out_dir)
    reporter.install_early_exit()  # a signal before the first step now writes result.json too
    try:
        from worker.train import run_training
    except ImportError as exc:  # an API-only install has no torch
        _say(f"error: training needs the 'train' extra ({exc}); run `uv sync`", file=sys.stderr)
        reporter.failed(errors.EngineError(f"training needs the 'train' extra ({exc})"))
        return 1

    bar = ProgressBar()  # extra ranks are `python -m worker.train` processes, never this command
    started = time.perf_counter()
    try:
        with _console_log():
            result = run_training(
                validated.train,
                validated.model,
                write_checkpoints=not smoke_test,
                on_row=bar.update,
                reporter=reporter,
                plan=validated.plan,
            )
    except KeyboardInterrupt as exc:  # reported by main()
        bar.close()
        reporter.failed(
            errors.Interrupted(
                exc.args[0] if exc.args else errors.BEFORE_START,
                signal_name="SIGINT",
                exit_code=130,
            )
        )
        raise
    except Exception as exc:  # one line for the user; the traceback on request
        bar.close()
        err = errors.classify(exc, validated.train.out_dir)
        reporter.failed(err)
        if err is not exc and os.environ.get("MOEJOBS_DEBUG"):
            raise
        if isinstance(err, errors.Interrupted) and str(err) == errors.BEFORE_START:
            _say(errors.BEFORE_START, file=sys.stderr)  # the one line, as from the early handlers
            return int(err.exit_code)
        hint = (
            " (MOEJOBS_DEBUG=1 shows the traceback)"
            if err is not exc and err.reason == FailureReason.crashed
            else ""
        )
        _say(f"error: {err.label}: {err}{hint}", file=sys.stderr)
        return int(err.exit_code)
    bar.close()
    reporter.succeeded(result)
    elapsed = time.perf_counter() - started
    planned = None
    if result.stopped_by == "nothing_to_do":
        planned = validated.plan.optimizer_steps
    _say(*format_summary(result, elapsed, smoke_test, planned_steps=planned))
    return 0


@contextmanager
def _console_log() -> Iterator[None]:
    """Show the engine's INFO lines (plan, MoE/attention/compile choices, checkpoints; the same
    lines as ``out_dir/train.log``) on stderr while training, written above the progress bar
    (tqdm's ``logging_redirect_tqdm``) instead of through it."""
    import logging

    from tqdm.contrib.logging import logging_redirect_tqdm

    logger = logging.getLogger("moejobs")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        with logging_redirect_tqdm(loggers=[logger]):
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def format_summary(
    result, elapsed_s: float, smoke_test: bool, planned_steps: int | None = None
) -> list[str]:
    """Lines of the end-of-run summary printed by the CLI. When ``result.stopped_by`` is
    ``"nothing_to_do"`` (``final/`` already held every planned step, so nothing trained), the
    first line says so and how to train more instead of "training finished"; ``planned_steps``
    (the plan's optimizer steps) completes that line when given. Raises nothing."""
    gib = result.peak_memory_bytes / 2**30 if result.peak_memory_bytes else 0.0
    if result.stopped_by == "nothing_to_do":
        of = f" of {planned_steps}" if planned_steps is not None else ""
        first = (
            f"nothing to train: final/ is already at step {result.steps}{of}; raise "
            f"train.max_tokens (or use a new out_dir) to train more"
        )
    else:
        first = "smoke test passed" if smoke_test else "training finished"
    lines = [
        first,
        f"  optimizer steps : {result.steps}",
        f"  tokens trained  : {result.tokens:,}",
        f"  final loss      : {result.final_loss:.4f}"
        if result.final_loss is not None
        else "  final loss      : -",
    ]
    if result.val_loss is not None:
        lines.append(f"  val loss        : {result.val_loss:.4f}")
    lines += [
        f"  checkpoint      : {result.checkpoint_dir or 'none written' + (' (smoke test)' if smoke_test else '')}",
        f"  metrics         : {Path(result.out_dir) / METRICS_FILE}",
        f"  log             : {Path(result.out_dir) / 'train.log'}",
        f"  peak memory     : {gib:.2f} GiB",
        f"  wall time       : {elapsed_s:.1f} s",
    ]
    return lines


def cmd_validate(args: argparse.Namespace) -> int:
    """``moejobs validate [TRAIN] [MODEL] [--preset] [--smoke-test]``: :func:`main` with
    ``--dry-run``; its exit codes."""
    argv = ["--config", args.train_config, "--model-config", args.model_config, "--dry-run"]
    if args.preset:
        argv += ["--preset", args.preset]
    if args.smoke_test:
        argv.append("--smoke-test")
    return main(argv, prog="moejobs validate")


def cmd_schema(args: argparse.Namespace) -> int:
    """``moejobs schema train|model``: the JSON Schema of a config document on stdout."""
    import json

    from service.config.model import model_config_json_schema
    from service.config.train import train_config_json_schema

    schema = train_config_json_schema() if args.which == "train" else model_config_json_schema()
    print(json.dumps(schema, indent=2))
    return 0
