"""The ``moejobs`` command: its argument parser and the dispatch to the module of each command
group (:mod:`cli.server`, :mod:`cli.runs`, :mod:`cli.train`, :mod:`cli.data`).

A command's module is imported only when that command runs: ``moejobs worker`` never loads the
HTTP client (nor, through the API's models, FastAPI), commands that do not train never load
torch, and ``moejobs train`` installs the early signal handlers before anything heavy.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class _Command:
    """The command ``target`` (``"module:function"``, a module of this package), imported when
    called with the parsed arguments; returns its exit code."""

    target: str

    def __call__(self, args: argparse.Namespace) -> int:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(f"cli.{module}"), name)(args)


def _step(value: str) -> str:
    if value == "final" or value.isdigit():
        return value
    raise argparse.ArgumentTypeError(f"expected a step number or 'final', got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand but ``train`` (whose arguments belong to
    :func:`cli.train.build_parser`); each sets ``func``: ``args.func(args)`` runs it and returns
    its exit code."""
    from service.models import RunStatus
    from service.resources import project_path

    settings_opts = argparse.ArgumentParser(add_help=False)
    settings_opts.add_argument(
        "--home", help="folder of the embedded defaults (MOEJOBS_HOME, default ~/.moejobs)"
    )
    settings_opts.add_argument("--host", help="API host (MOEJOBS_HOST, default 127.0.0.1)")
    settings_opts.add_argument("--port", type=int, help="API port (MOEJOBS_PORT, default 8000)")

    p = argparse.ArgumentParser(
        prog="moejobs", description="Training jobs for LitGPT Mixture-of-Experts models."
    )
    sub = p.add_subparsers(dest="command", required=True)

    # -- the service on this machine (cli.server, cli.data) --------------------------------------
    d = sub.add_parser(
        "demo",
        parents=[settings_opts],
        help="up + demo data, smoke test, train cpu-tiny through the service, print a sample, keep serving",
    )
    d.add_argument("--prompt", default="def ")
    d.add_argument(
        "--skip-smoke-test",
        action="store_true",
        help="skip the MoE-200M smoke test (needs ~9 GiB RAM on CPU)",
    )
    d.add_argument(
        "--exit",
        action="store_true",
        help="stop the services after the sample instead of serving until Ctrl-C",
    )
    d.set_defaults(func=_Command("server:cmd_demo"))

    sd = sub.add_parser(
        "seed-data",
        help="write the demo corpus and tokenizer to ROOT/data/ (what the shipped configs read)",
    )
    sd.add_argument(
        "--root", default=".", help="the shipped configs' ./data/... paths resolve here"
    )
    sd.set_defaults(func=_Command("data:cmd_seed_data"))

    u = sub.add_parser(
        "up",
        parents=[settings_opts],
        help="migrate, then run the API, one training worker and one aux worker until Ctrl-C",
    )
    u.set_defaults(func=_Command("server:cmd_up"))
    s = sub.add_parser(
        "serve",
        parents=[settings_opts],
        help="run the API (production: many of these behind a proxy)",
    )
    s.set_defaults(func=_Command("server:cmd_serve"))
    w = sub.add_parser("worker", parents=[settings_opts], help="run one worker (one per GPU slot)")
    w.add_argument(
        "--role",
        choices=["all", "train", "aux"],
        default=None,
        help="queues to consume: all (runs, then tokenizers and data preparation; the "
        "default, MOEJOBS_WORKER_ROLE), train (runs only: a GPU slot), aux (tokenizers "
        "and data preparation only, beside the GPU slots)",
    )
    w.add_argument("--loglevel", default="INFO")
    w.add_argument("--hostname", help="Celery node name")
    w.set_defaults(func=_Command("server:cmd_worker"))
    m = sub.add_parser(
        "migrate", parents=[settings_opts], help="upgrade the database to the newest migration"
    )
    m.set_defaults(func=_Command("server:cmd_migrate"))

    # -- a server's runs over HTTP (cli.runs) ----------------------------------------------------
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=None,
        help="API base URL (default: MOEJOBS_URL, else http://MOEJOBS_HOST:PORT)",
    )
    common.add_argument(
        "--token", default=None, help="API bearer token (default: MOEJOBS_API_TOKEN)"
    )

    c = sub.add_parser("submit", parents=[common], help="submit a training run to the server")
    c.add_argument("train_config", help="train config (YAML or JSON)")
    c.add_argument("model_config", help="model config (YAML or JSON)")
    c.add_argument("--name", default=None, help="run name (default: the train file's name)")
    c.add_argument("--preset", default=None, help="preset applied by the server")
    c.add_argument("--follow", action="store_true", help="then follow it like status --follow")
    c.add_argument(
        "--tag", action="append", default=None, metavar="TAG", help="a tag of the run (repeatable)"
    )
    c.add_argument("--note", default=None, help="a note about the run")
    c.set_defaults(func=_Command("runs:cmd_submit"))

    c = sub.add_parser("runs", parents=[common], help="list runs on the server")
    c.add_argument("--status", default=None, choices=[s.value for s in RunStatus])
    c.add_argument("--limit", type=int, default=20)
    c.add_argument("--sort", default=None, help="created_at, name or status; '-' for descending")
    c.add_argument("--cursor", default=None, help="next page (printed after a full page)")
    c.add_argument(
        "--tag",
        action="append",
        default=None,
        metavar="TAG",
        help="runs with this tag (all of them)",
    )
    c.add_argument("--name", default=None, help="runs whose name contains this (any case)")
    c.set_defaults(func=_Command("runs:cmd_runs"))

    c = sub.add_parser("status", parents=[common], help="show a run")
    c.add_argument("run_id")
    c.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="progress bar until the run finishes (exit 0 only if it succeeded)",
    )
    c.set_defaults(func=_Command("runs:cmd_status"))

    c = sub.add_parser("cancel", parents=[common], help="cancel a run")
    c.add_argument("run_id")
    c.set_defaults(func=_Command("runs:cmd_cancel"))

    # -- issue 11: compare, tags and notes, delete, logs (cli.runs) ------------------------------
    c = sub.add_parser(
        "compare",
        parents=[common],
        help="compare runs: final and best metrics, the config keys that differ",
    )
    c.add_argument("run_ids", nargs="+", metavar="ID", help="2 or more run ids")
    c.set_defaults(func=_Command("runs:cmd_compare"))

    c = sub.add_parser("tag", parents=[common], help="add or remove tags, set a run's note")
    c.add_argument("run_id")
    c.add_argument("--add", action="append", default=None, metavar="TAG", help="repeatable")
    c.add_argument("--remove", action="append", default=None, metavar="TAG", help="repeatable")
    note = c.add_mutually_exclusive_group()
    note.add_argument("--note", default=None, help="replace the note")
    note.add_argument("--clear-note", action="store_true", help="remove the note")
    c.set_defaults(func=_Command("runs:cmd_tag"))

    c = sub.add_parser("delete", parents=[common], help="delete a finished run and its files")
    c.add_argument("run_id")
    c.set_defaults(func=_Command("runs:cmd_delete"))

    c = sub.add_parser("logs", parents=[common], help="print a run's log")
    c.add_argument("run_id")
    c.add_argument("--tail", type=int, default=200, help="last N lines (default 200)")
    c.add_argument(
        "--follow", "-f", action="store_true", help="then print new lines until the run ends"
    )
    c.set_defaults(func=_Command("runs:cmd_logs"))

    c = sub.add_parser(
        "download", parents=[common], help="download a checkpoint folder (LitGPT format)"
    )
    c.add_argument("run_id")
    c.add_argument(
        "--step", type=_step, default=None, help="checkpoint step (default: the final checkpoint)"
    )
    c.add_argument(
        "--out", default=None, help="folder to extract into, or a .tar file (default: ./ID-final)"
    )
    c.add_argument(
        "--weights-only",
        action="store_true",
        help="only what LitGPT loads (weights, model config, tokenizer): no optimizer state",
    )
    c.add_argument(
        "--format",
        choices=("pth", "safetensors"),
        default="pth",
        help="weights as lit_model.pth (default) or model.safetensors (implies --weights-only)",
    )
    c.set_defaults(func=_Command("runs:cmd_download"))

    # -- sweeps (issue 11, cli.sweeps) --
    c = sub.add_parser("sweep", help="sweeps on the server: create, list, status, cancel")
    ssub = c.add_subparsers(dest="sweep_command", required=True)
    sc_ = ssub.add_parser("create", parents=[common], help="create a sweep from a YAML/JSON file")
    sc_.add_argument("file")
    sc_.set_defaults(func=_Command("sweeps:cmd_sweep"))
    sc_ = ssub.add_parser("list", parents=[common], help="list the sweeps, newest first")
    sc_.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    sc_.set_defaults(func=_Command("sweeps:cmd_sweep"))
    sc_ = ssub.add_parser("status", parents=[common], help="show a sweep and its trials")
    sc_.add_argument("sweep_id")
    sc_.add_argument(
        "--follow", "-f", action="store_true", help="until it ends (exit 0 only if finished)"
    )
    sc_.set_defaults(func=_Command("sweeps:cmd_sweep"))
    sc_ = ssub.add_parser("cancel", parents=[common], help="cancel a sweep and its trials")
    sc_.add_argument("sweep_id")
    sc_.set_defaults(func=_Command("sweeps:cmd_sweep"))

    c = sub.add_parser(
        "smoke-test",
        parents=[common],
        help="run the server's smoke test and print its stage timings",
    )
    c.add_argument("--wait", type=float, default=900.0, help="seconds to wait for the verdict")
    c.set_defaults(func=_Command("runs:cmd_smoke_test"))

    # -- local training and config documents (cli.train), tokenizers (cli.data) -----------------
    sub.add_parser(
        "train",
        help="train locally: same flags as run_train.py (moejobs train --help)",
        add_help=False,
    )

    v = sub.add_parser(
        "validate",
        help="run_train.py --dry-run: validate the configs, check their input "
        "folders (from the current folder), print warnings, the estimate and the device "
        "pre-flight; exit 0 ok, 2 invalid config, 1 missing input",
    )
    v.add_argument(
        "train_config",
        nargs="?",
        default=str(project_path("configs") / "train_config.yaml"),
        help="default: the shipped configs/train_config.yaml, as run_train.py",
    )
    v.add_argument(
        "model_config",
        nargs="?",
        default=str(project_path("configs") / "model_config.yaml"),
        help="default: the shipped configs/model_config.yaml",
    )
    v.add_argument("--preset")
    v.add_argument("--smoke-test", action="store_true")
    v.set_defaults(func=_Command("train:cmd_validate"))

    sc = sub.add_parser("schema", help="print the JSON Schema of a config")
    sc.add_argument("which", choices=["train", "model"])
    sc.set_defaults(func=_Command("train:cmd_schema"))

    t = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="train a byte-level BPE tokenizer folder that LitGPT loads")
    tt.add_argument(
        "--data", action="append", required=True, help="folder of .txt files (repeatable)"
    )
    tt.add_argument("--out", required=True, help="tokenizer folder to write")
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.set_defaults(func=_Command("data:cmd_tokenizer_train"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``moejobs ARGV`` (default: ``sys.argv[1:]``); returns the exit code. Raises
    SystemExit for argument errors (exit 2) and for ``--help``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # everything after `train` belongs to run_train.py's parser
        from worker.early import install_early_handlers  # torch-free, as in run_train.py

        install_early_handlers()  # before the engine's heavy imports: Ctrl-C exits 130 at once
        from cli.train import main as train_main

        return train_main(argv[1:], prog="moejobs train")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
