"""The ``moejobs`` command.

Subcommands that train import torch lazily, so the command works on an API-only install for
everything else.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.resources import project_path


def _cmd_schema(args: argparse.Namespace) -> int:
    from service.config.model import model_config_json_schema
    from service.config.train import train_config_json_schema

    schema = train_config_json_schema() if args.which == "train" else model_config_json_schema()
    print(json.dumps(schema, indent=2))
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    """Train a tokenizer folder; one ``error: ...`` line and exit 2 when the data or ``--out``
    is unusable (``--out`` must be new, empty or an earlier tokenizer folder), ``warning: ...``
    lines when the corpus yields fewer ids than ``--vocab-size``."""
    from worker.errors import DataError
    from worker.tokenizer import train_tokenizer, vocab_warnings

    try:
        out = train_tokenizer(
            [Path(d) for d in args.data], Path(args.out), vocab_size=args.vocab_size
        )
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in vocab_warnings(out, args.vocab_size):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"tokenizer written to {out}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from worker.cli import main as train_main

    argv = ["--config", args.train_config, "--model-config", args.model_config, "--dry-run"]
    if args.preset:
        argv += ["--preset", args.preset]
    if args.smoke_test:
        argv.append("--smoke-test")
    return train_main(argv, prog="moejobs validate")


def _apply_settings(args: argparse.Namespace):
    """Install the settings named by ``--home/--host/--port`` (else the environment), create
    their folders, and return them. Malformed or unsafe settings and folders that cannot be
    created exit 2 (SystemExit) with one ``error: NAME: problem`` line per problem, NAME being
    the flag or the ``MOEJOBS_*`` variable the user set."""
    from service.settings import InvalidSettingsError, load_settings, use_settings

    given = {
        "home": args.home,
        "host": args.host,
        "port": args.port,
        "worker_role": getattr(args, "role", None),
    }
    values = {k: Path(v) if k == "home" else v for k, v in given.items() if v not in (None, "")}
    labels = {k: "--role" if k == "worker_role" else f"--{k}" for k in values}
    try:
        settings = load_settings(**values)
        settings.ensure_dirs()
    except InvalidSettingsError as exc:
        for line in exc.lines(labels):
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(2) from None
    use_settings(settings)
    return settings


def _cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade the database to the newest migration; exit 1 with one line when the database
    cannot be reached (wrong host, port or password in MOEJOBS_DATABASE_URL, server down)."""
    import sqlalchemy as sa

    from service.db import current_revision, make_engine, migrate

    settings = _apply_settings(args)
    try:
        migrate(settings)
        engine = make_engine(settings.database_url)
        try:
            print(f"database at migration {current_revision(engine)}")
        finally:
            engine.dispose()
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        url = sa.make_url(settings.database_url).render_as_string(hide_password=True)
        reason = " ".join((str(exc.orig or exc).strip().splitlines() or [""])[0].split())
        print(
            f"error: cannot reach the database of MOEJOBS_DATABASE_URL ({url}): {reason}",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.db import StartupError, check_schema, open_database
    from service.main import serve

    settings = _apply_settings(args)
    # The app's lifespan makes the same check; doing it first turns uvicorn's start-up
    # traceback into one line that says what to do.
    db = open_database(settings)
    try:
        check_schema(db, settings)
    except StartupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    serve(settings)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from worker.celery_app import run_worker

    return run_worker(_apply_settings(args), loglevel=args.loglevel, hostname=args.hostname)


#: The signal that started the stop of ``up``/``demo`` (SIGINT when none was recorded).
_stop_signal: int | None = None


def _interrupt_once(signum, frame) -> None:
    # The first SIGINT or SIGTERM starts the orderly stop; any later one is ignored so that it
    # cannot abort that stop half-way (Ctrl-C reaches every process of the terminal's group and
    # `uv run` forwards it once more; supervisors may repeat SIGTERM).
    global _stop_signal
    _stop_signal = signum
    _ignore_further_interrupts()
    raise KeyboardInterrupt


def _interrupted_exit_code() -> int:
    """128 + the signal that interrupted: 130 for Ctrl-C, 143 for SIGTERM."""
    import signal

    return 128 + int(_stop_signal or signal.SIGINT)


def _stop_on_signals() -> None:
    """Make Ctrl-C and SIGTERM (``kill PID``, ``timeout``, ``docker stop``, systemd) raise
    KeyboardInterrupt once in the main thread, so both take the same orderly stop. Without this,
    SIGTERM killed ``up``/``demo`` at once and left the API and the worker running: they sit in
    process groups of their own, so no signal sent to this process reaches them."""
    import signal

    signal.signal(signal.SIGINT, _interrupt_once)
    signal.signal(signal.SIGTERM, _interrupt_once)


def _start_stack(settings):
    """Start a :class:`service.stack.LocalStack` for ``settings`` and return it once ready.
    From here on SIGTERM behaves as Ctrl-C. An interrupt before the stack is ready stops what
    was started and exits 130 (Ctrl-C) or 143 (SIGTERM). Raises SystemExit with a one-line
    message when the stack cannot start."""
    from service.stack import LocalStack, StackError

    _stop_on_signals()
    stack = LocalStack(settings)
    print(
        f"starting the API, a training worker and an aux worker under {settings.home} (logs in {stack.log_dir}) ...",
        flush=True,
    )
    try:
        stack.start(progress=lambda line: print(line, flush=True))
    except StackError as exc:
        stack.stop(timeout=10)
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:
        _ignore_further_interrupts()
        print("\nstopping ...", flush=True)
        stack.stop(timeout=30)
        raise SystemExit(_interrupted_exit_code()) from None
    print(f"ready: dashboard {stack.base_url}/   API docs {stack.base_url}/docs", flush=True)
    return stack


def _ignore_further_interrupts() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _serve_until_interrupted(stack) -> int:
    """Serve until Ctrl-C or SIGTERM (exit code 0), or until a child process exits (1); stops
    the stack in every case."""
    print("serving until Ctrl-C (or SIGTERM)", flush=True)
    try:
        code = stack.wait()
        print(f"a child process exited with code {code}; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _ignore_further_interrupts()
        print("\nstopping (a running training is checkpointed and re-queued) ...", flush=True)
        return 0
    finally:
        _ignore_further_interrupts()
        stack.stop()


def _cmd_up(args: argparse.Namespace) -> int:
    return _serve_until_interrupted(_start_stack(_apply_settings(args)))


def seed_demo_data(data_root: Path) -> dict[str, Path]:
    """Put the demo corpus and tokenizer where the shipped train config's relative paths
    resolve under ``data_root`` (``./data/custom_text/{train,val}``, ``./data/tokenizer``), so
    the shipped defaults run as submitted. Existing data is kept."""
    from worker.corpus import build_corpus
    from worker.tokenizer import train_tokenizer

    base = Path(data_root) / "data"
    train_dir, val_dir = build_corpus(base / "custom_text")
    tokenizer = base / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        train_tokenizer([train_dir], tokenizer, vocab_size=4096)
    return {"train": train_dir, "val": val_dir, "tokenizer": tokenizer}


def _cmd_seed_data(args: argparse.Namespace) -> int:
    paths = seed_demo_data(Path(args.root))
    for key, path in paths.items():
        print(f"{key:9s} {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from service import client

    settings = _apply_settings(args)
    paths = seed_demo_data(settings.data_root)
    n_train = len(list(paths["train"].glob("*.txt")))
    print(
        f"== demo data: {n_train} training files of Python standard-library source and a "
        f"4,096-id BPE tokenizer under {paths['tokenizer'].parent}"
    )
    stack = _start_stack(settings)
    base = stack.base_url
    try:
        if not args.skip_smoke_test:
            print(
                "\n== smoke test: the shipped MoE-200M configs with the spec's smoke-test overrides, "
                "through the queue and the worker (about 9 GiB of RAM on a CPU)",
                flush=True,
            )
            result = client.smoke_test(base, wait=1800)
            if client.smoke_state(result) != "passed":
                print("smoke test failed; see above", file=sys.stderr)
                return 1
        print(
            "\n== submitting the shipped configs with the cpu-tiny preset (a 4-layer, 4-expert MoE)",
            flush=True,
        )
        configs = project_path("configs")
        run = client.submit(
            base,
            configs / "train_config.yaml",
            configs / "model_config.yaml",
            name="demo-cpu-tiny",
            preset="cpu-tiny",
        )
        final_run = client.status(base, run["id"], follow=True)
        if final_run.get("status") != "succeeded":
            print(f"the demo run ended {final_run.get('status')}", file=sys.stderr)
            return 1
        final = Path(settings.runs_dir) / str(run["id"]) / "out" / "final"
        from worker.sample import generate_sample

        print(f"\n== a sample from {final}:\n", flush=True)
        print(generate_sample(final, args.prompt, max_new_tokens=120))
        print(
            f"\n== the trained model: {final} (a LitGPT checkpoint folder; "
            f"`uv run litgpt generate {final} --prompt 'def '` works on it; "
            f"`uv run moejobs download {run['id']}` fetches it over HTTP)"
        )
        if args.exit:
            return 0
        print(f"== dashboard: {base}/   API docs: {base}/docs   (Ctrl-C stops the service)")
    except client.ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _ignore_further_interrupts()
        print("\nstopping ...", flush=True)
        stack.stop()
        return _interrupted_exit_code()
    except BaseException:
        stack.stop()
        raise
    else:
        return _serve_until_interrupted(stack)
    finally:
        if args.exit:
            stack.stop()


def _cmd_train(argv: list[str]) -> int:
    from worker.cli import main as train_main

    return train_main(argv, prog="moejobs train")


def build_parser() -> argparse.ArgumentParser:
    from service.client import add_client_commands

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
    d.set_defaults(func=_cmd_demo)

    sd = sub.add_parser(
        "seed-data",
        help="write the demo corpus and tokenizer to ROOT/data/ (what the shipped configs read)",
    )
    sd.add_argument(
        "--root", default=".", help="the shipped configs' ./data/... paths resolve here"
    )
    sd.set_defaults(func=_cmd_seed_data)

    u = sub.add_parser(
        "up",
        parents=[settings_opts],
        help="migrate, then run the API, one training worker and one aux worker until Ctrl-C",
    )
    u.set_defaults(func=_cmd_up)
    s = sub.add_parser(
        "serve",
        parents=[settings_opts],
        help="run the API (production: many of these behind a proxy)",
    )
    s.set_defaults(func=_cmd_serve)
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
    w.set_defaults(func=_cmd_worker)
    m = sub.add_parser(
        "migrate", parents=[settings_opts], help="upgrade the database to the newest migration"
    )
    m.set_defaults(func=_cmd_migrate)

    add_client_commands(sub)

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
    v.set_defaults(func=_cmd_validate)

    sc = sub.add_parser("schema", help="print the JSON Schema of a config")
    sc.add_argument("which", choices=["train", "model"])
    sc.set_defaults(func=_cmd_schema)

    t = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="train a byte-level BPE tokenizer folder that LitGPT loads")
    tt.add_argument(
        "--data", action="append", required=True, help="folder of .txt files (repeatable)"
    )
    tt.add_argument("--out", required=True, help="tokenizer folder to write")
    tt.add_argument("--vocab-size", type=int, default=4096)
    tt.set_defaults(func=_cmd_tokenizer_train)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # everything after `train` belongs to run_train.py's parser
        from worker.entry import install_early_handlers  # torch-free, as in run_train.py

        install_early_handlers()  # before the engine's heavy imports: Ctrl-C exits 130 at once
        return _cmd_train(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
