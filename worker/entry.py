"""``python -m worker.entry --train-config T.yaml --model-config M.yaml [--no-checkpoints]``:
the training process a worker's runner starts. Thin on purpose, and to be kept thin: it
installs the SIGINT/SIGTERM handlers and the fence before it imports anything heavy, so a
signal in the first instant is never lost (torch alone takes seconds to import).

Order:

1. the parent-death signal (``worker.launch.die_with_parent``: the process never outlives its
   worker) and handlers that turn SIGINT/SIGTERM into one line on stderr, ``interrupted before
   training started``, and exit 130/143 with nothing trained;
2. the fence (``worker.fence``): the watchdog on the worker's heartbeat pipe, the owner file
   of ``out_dir`` (read from the train config, relative to the working directory);
3. the ``started`` event (``service.contract``);
4. the engine named by ``MOEJOBS_ENGINE``: ``litgpt`` (default, ``worker.train.main``) or
   ``stub`` (``worker.stub.main``, torch-free, for tests). The engine replaces the handlers
   with its own (stop at the next optimizer-step boundary) once it can honour them.

Exit codes: ``service.contract.ExitCode``.
"""
from __future__ import annotations

import os
import signal
import sys


def _before_start(signum: int, _frame: object) -> None:
    try:
        sys.stderr.write("interrupted before training started\n")
        sys.stderr.flush()
    finally:
        os._exit(128 + signum)


def install_early_handlers() -> None:
    """SIGINT/SIGTERM -> one line on stderr and exit 128 + N at once (nothing trained)."""
    signal.signal(signal.SIGINT, _before_start)
    signal.signal(signal.SIGTERM, _before_start)


def _out_dir(argv: list[str]) -> str:
    """``out_dir`` of the train config named by ``--train-config`` (LitGPT's default
    ``out/pretrain`` when it is not set or the file cannot be read: the engine reports that)."""
    path = None
    for i, arg in enumerate(argv):
        if arg == "--train-config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--train-config="):
            path = arg.split("=", 1)[1]
    if path:
        try:
            import yaml

            with open(path, encoding="utf-8") as fh:
                doc = yaml.safe_load(fh)
            if isinstance(doc, dict) and isinstance(doc.get("out_dir"), str):
                return doc["out_dir"]
        except (OSError, ValueError, yaml.YAMLError):
            pass
    return "out/pretrain"


def main(argv: list[str] | None = None) -> int:
    """Run the engine (module docstring); returns its exit code."""
    install_early_handlers()
    from worker.launch import die_with_parent

    die_with_parent()
    argv = list(sys.argv[1:] if argv is None else argv)
    out_dir = _out_dir(argv)

    from service import contract
    from worker import fence

    guard = fence.install(out_dir)
    try:
        contract.append_event(out_dir, contract.EventKind.started, attempt=guard.attempt)
    except OSError:
        pass  # the engine reports an unwritable out_dir itself
    engine = os.environ.get(contract.ENV_ENGINE, "litgpt")
    if engine == "stub":
        from worker.stub import main as engine_main
    else:
        from worker.train import main as engine_main
    return engine_main(argv)


if __name__ == "__main__":
    sys.exit(main())
