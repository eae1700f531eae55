"""``moejobs up/demo/serve/worker/migrate``: the service on this machine.

``--home/--host/--port`` (and ``worker --role``) become the process's settings; ``up`` and ``demo`` run the API and two workers as child processes
(:class:`cli.stack.LocalStack`) and stop them on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.resources import project_path


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


def cmd_migrate(args: argparse.Namespace) -> int:
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


def cmd_serve(args: argparse.Namespace) -> int:
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


def cmd_worker(args: argparse.Namespace) -> int:
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
    """Start a :class:`cli.stack.LocalStack` for ``settings`` and return it once ready.
    From here on SIGTERM behaves as Ctrl-C. An interrupt before the stack is ready stops what
    was started and exits 130 (Ctrl-C) or 143 (SIGTERM). Raises SystemExit with a one-line
    message when the stack cannot start."""
    from cli.stack import LocalStack, StackError

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
    if stack.base_url != _client_default_url():  # e.g. `up --port 8617`: say how to reach it
        print(
            f"       the other moejobs commands reach it with --url {stack.base_url} "
            f"or: export MOEJOBS_URL={stack.base_url}",
            flush=True,
        )
    return stack


def _client_default_url() -> str | None:
    """Where ``moejobs submit``/``runs``/... look without ``--url`` (None: settings invalid)."""
    from cli.http import ClientError, default_base_url

    try:
        return default_base_url()
    except ClientError:
        return None


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


def cmd_up(args: argparse.Namespace) -> int:
    return _serve_until_interrupted(_start_stack(_apply_settings(args)))


def cmd_demo(args: argparse.Namespace) -> int:
    from cli import runs
    from cli.data import seed_demo_data
    from cli.http import ClientError
    from cli.output import smoke_state

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
            result = runs.smoke_test(base, wait=1800)
            if smoke_state(result) != "passed":
                print("smoke test failed; see above", file=sys.stderr)
                return 1
        print(
            "\n== submitting the shipped configs with the cpu-tiny preset (a 4-layer, 4-expert MoE)",
            flush=True,
        )
        configs = project_path("configs")
        run = runs.submit(
            base,
            configs / "train_config.yaml",
            configs / "model_config.yaml",
            name="demo-cpu-tiny",
            preset="cpu-tiny",
        )
        final_run = runs.status(base, str(run.id), follow=True)
        if final_run.status != "succeeded":
            print(f"the demo run ended {final_run.status}", file=sys.stderr)
            return 1
        final = Path(settings.runs_dir) / str(run.id) / "out" / "final"
        from worker.sample import generate_sample

        print(f"\n== a sample from {final}:\n", flush=True)
        print(generate_sample(final, args.prompt, max_new_tokens=120))
        print(
            f"\n== the trained model: {final} (a LitGPT checkpoint folder; "
            f"`uv run litgpt generate {final} --prompt 'def '` works on it; "
            f"`uv run moejobs download {run.id}` fetches it over HTTP)"
        )
        if args.exit:
            return 0
        print(f"== dashboard: {base}/   API docs: {base}/docs   (Ctrl-C stops the service)")
    except ClientError as exc:
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
