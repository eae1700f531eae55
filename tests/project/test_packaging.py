"""The built wheel: it carries the shipped configs, migrations and alembic.ini (inside the
service package) and its core needs no torch, so an API-only install can migrate a database,
load presets and validate configs away from the source checkout. And the worker process never
loads the web application (the API's side of that, no torch, is in tests/service/api/test_runs.py)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from tests.support import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("uv is not on PATH: the README installs and tests the project with uv")
    dest = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [uv, "build", "--wheel", "--out-dir", str(dest), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = dest.glob("moejobs-*.whl")
    return built


def test_wheel_carries_the_shipped_files_and_keeps_torch_optional(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(zf.read(metadata_name).decode())
        scripts_name = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = zf.read(scripts_name).decode()
    for shipped in ("configs", "migrations"):
        tracked = subprocess.run(
            ["git", "ls-files", shipped], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split()
        assert tracked, f"git lists nothing under {shipped}/"
        assert {f"service/_bundled/{path}" for path in tracked} <= names
    assert "service/_bundled/alembic.ini" in names
    assert {"service/static/index.html", "service/static/app.js", "worker/train.py"} <= names
    assert "cli/main.py" in names and "moejobs = cli.main:main" in scripts.splitlines()
    requires = metadata.get_all("Requires-Dist")
    core = [r for r in requires if "extra ==" not in r]
    train_extra = [r for r in requires if "extra == 'train'" in r or 'extra == "train"' in r]
    assert not [
        r for r in core if r.split()[0].lower().startswith(("torch", "litgpt", "lightning"))
    ]
    assert any(r.startswith("torch") for r in train_extra)


def test_installed_wheel_migrates_and_loads_presets_outside_the_checkout(wheel, tmp_path):
    """The wheel unpacked (what an installer does) first on sys.path, run from an unrelated
    folder: shipped files come from the wheel, not from this repository."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEJOBS_")}
    env.update(PYTHONPATH=str(site), MOEJOBS_HOME=str(home))
    code = (
        "import sys, service, service.resources as r, service.config.presets as c\n"
        "from cli.main import main\n"
        "print(service.__file__)\n"
        "print(r.project_path('migrations'))\n"
        "print(sorted(c.list_presets()))\n"
        "sys.exit(main(['migrate']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    module, migrations, presets = done.stdout.splitlines()[:3]
    assert Path(module).is_relative_to(site)
    assert Path(migrations) == site / "service" / "_bundled" / "migrations"
    assert presets == "['cpu-tiny', 'production']"
    with sqlite3.connect(home / "moejobs.sqlite3") as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
    assert {"alembic_version", "runs", "metric_points", "checkpoints"} <= tables


def test_api_only_install_has_no_torch_and_reaches_a_redis_broker(tmp_path):
    """`uv sync --no-dev --no-default-groups` (the API image's install): no torch, and kombu's
    Redis transport works (it imports `packaging`, which only torch's dependencies brought in
    before `celery[redis]`)."""
    from tests.support.worker import require_redis

    broker = require_redis()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEJOBS_", "VIRTUAL_ENV"))}
    env["UV_PROJECT_ENVIRONMENT"] = str(tmp_path / "venv")
    done = subprocess.run(
        [
            shutil.which("uv") or "uv",
            "sync",
            "--frozen",
            "--no-dev",
            "--no-default-groups",
            "--quiet",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('torch') is None, 'torch in an API-only install'\n"
        "from service.settings import Settings\n"
        "from service.queue import check_broker, make_celery\n"
        f"s = Settings(home={str(tmp_path / 'home')!r}, broker_url={broker!r})\n"
        "problem = check_broker(make_celery(s), s.celery_queue)\n"
        "print(problem or 'broker up')\n"
    )
    env["MOEJOBS_HOME"] = str(tmp_path / "home")
    ran = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "python"), "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.strip() == "broker up"
    # the CLI's torch-free commands work there too (the API image copies worker/ for them);
    # `validate` checks the shipped config's ./data/... inputs in the working folder
    work = tmp_path / "work"
    for folder in ("data/custom_text/train", "data/custom_text/val", "data/tokenizer"):
        (work / folder).mkdir(parents=True)
    (work / "data/custom_text/train/a.txt").write_text("text\n")
    (work / "data/custom_text/val/b.txt").write_text("text\n")
    (work / "data/tokenizer/tokenizer.json").write_text("{}")
    checked = subprocess.run(
        [
            str(tmp_path / "venv" / "bin" / "python"),
            "-m",
            "cli.main",
            "validate",
            str(REPO / "configs/train_config.yaml"),
            str(REPO / "configs/model_config.yaml"),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "549,146,880" in checked.stdout
    assert "device pre-flight skipped: training needs the 'train' extra" in checked.stderr


def test_the_worker_process_loads_no_fastapi(tmp_path):
    """What a worker does before and beside training (the schema check of its start-up, its
    Celery app and tasks, a reconciler pass) imports neither FastAPI nor Starlette, nor
    ``service.main`` or ``service.api``."""
    code = (
        "import sys\n"
        "from service.db import migrate\n"
        "from service.settings import Settings\n"
        "from worker import celery_app, prepare, reconciler, registry, runner, tasks\n"
        f"s = Settings(home={str(tmp_path / 'home')!r})\n"
        "migrate(s)\n"
        "assert celery_app._database_problem(s) is None\n"
        "reconciler.reconcile(s, celery_app=celery_app.create_app(s))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette')\n"
        "             or m == 'service.main' or m.startswith('service.api')))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEJOBS_")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"
