"""``python -m worker.entry --train-config T.yaml --model-config M.yaml [--no-checkpoints]``:
the training process a worker's runner starts. Thin on purpose, and to be kept thin: it
installs the SIGINT/SIGTERM handlers and the fence before it imports anything heavy, so a
signal in the first instant is never lost (torch alone takes seconds to import).

Order:

1. the parent-death signal (``worker.launch.die_with_parent``: the process never outlives its
   worker) and the early handlers (``worker.early``) that turn SIGINT/SIGTERM into one line on
   stderr, ``interrupted before training started``, and exit 130/143 with nothing trained;
2. the fence (``worker.fence``): the watchdog on the worker's heartbeat pipe, the owner file
   of ``out_dir`` (read from the raw train config, relative to the working directory:
   ``worker.reporting.raw_out_dir``);
3. the ``started`` event (``service.contract``), and a hook that makes a signal from here on
   write ``result.json`` (outcome ``interrupted``) before the exit;
4. the engine named by ``MOEJOBS_ENGINE``: ``litgpt`` (default, ``worker.train.main``) or
   ``stub`` (``worker.stub.main``, torch-free, for tests). The engine keeps the early
   handlers through data preparation, model build and compile, and replaces them with its own
   (stop at the next optimizer-step boundary, ``worker.train.StopFlag``) when its first
   optimizer step begins.

Exit codes: ``service.contract.ExitCode``.
"""

from __future__ import annotations

import os
import sys

from worker.early import install_early_handlers


def _train_config(argv: list[str]) -> str | None:
    """The path given with ``--train-config``, if any."""
    path = None
    for i, arg in enumerate(argv):
        if arg == "--train-config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--train-config="):
            path = arg.split("=", 1)[1]
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the engine (module docstring); returns its exit code."""
    install_early_handlers()
    from worker.launch import die_with_parent

    die_with_parent()
    argv = list(sys.argv[1:] if argv is None else argv)

    from service import contract
    from worker import fence, reporting

    out_dir = reporting.raw_out_dir(_train_config(argv))
    fence.install(out_dir)
    reporter = reporting.Reporter(out_dir)
    reporter.install_early_exit()
    reporter.event(contract.EventKind.started)
    engine = os.environ.get(contract.ENV_ENGINE, "litgpt")
    if engine == "stub":
        from worker.stub import main as engine_main
    else:
        from worker.train import main as engine_main
    return engine_main(argv)


if __name__ == "__main__":
    # Run as the module worker.entry, not as a second copy named __main__.
    from worker.entry import main as _main

    sys.exit(_main())
