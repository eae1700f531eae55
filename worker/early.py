"""The early SIGINT/SIGTERM handlers of a training process: installed first (stdlib only, before
torch is imported), kept until the engine's first optimizer step begins.

A signal in that window writes one line on stderr, ``interrupted before training started``,
calls the exit hook (``worker.reporting.Reporter.install_early_exit`` sets it to write
``result.json``) and exits 128 + N: 130 for SIGINT, 143 for SIGTERM, nothing trained. The
engine recognises these handlers (:func:`is_early_handler`) and replaces them with its own
(``worker.train.StopFlag``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

#: Called with the signal number just before an early handler exits; None: exit without a
#: result.
_early_exit_hook: Callable[[int], object] | None = None


def _before_start(signum: int, _frame: object) -> None:
    try:
        # os.write: a handler may interrupt a write to sys.stderr, whose buffer is not reentrant
        os.write(2, b"interrupted before training started\n")
        hook = _early_exit_hook
        if hook is not None:
            hook(signum)
    finally:
        os._exit(128 + signum)


def install_early_handlers() -> None:
    """SIGINT/SIGTERM -> one line on stderr, the exit hook when one is set
    (:func:`set_early_exit_hook`), and exit 128 + N at once: 130 SIGINT, 143 SIGTERM (nothing
    trained). The engine keeps them until its first optimizer step begins
    (``worker.train.StopFlag.arm``)."""
    signal.signal(signal.SIGINT, _before_start)
    signal.signal(signal.SIGTERM, _before_start)


def is_early_handler(handler: object) -> bool:
    """Whether ``handler`` (from ``signal.getsignal``) is this module's early handler."""
    return handler is _before_start


def set_early_exit_hook(hook: Callable[[int], object] | None) -> None:
    """Call ``hook(signum)`` (it must not raise for long) before an early handler exits."""
    global _early_exit_hook
    _early_exit_hook = hook
