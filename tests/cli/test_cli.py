"""run_train.py / moejobs as a user runs them: exit codes, messages, precedence, dry runs."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from cli.train import build_parser, train_overrides
from tests.support import REPO


def run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def seeded(tmp_path: Path, corpus: Path, tokenizer_dir: Path) -> Path:
    """A working folder where the shipped config's relative input paths exist:
    ``./data/custom_text/{train,val}`` and ``./data/tokenizer`` (links to the session's corpus
    and tokenizer), as ``moejobs seed-data`` leaves them."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "custom_text").symlink_to(corpus, target_is_directory=True)
    (tmp_path / "data" / "tokenizer").symlink_to(tokenizer_dir, target_is_directory=True)
    return tmp_path


TRAIN_PY = str(REPO / "run_train.py")


def test_flags_map_to_config_keys():
    args = build_parser().parse_args(
        [
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "64",
            "--compile",
            "false",
            "--no-gradient-checkpointing",
            "--train-data-path",
            "d/t",
            "--devices",
            "2",
            "--resume",
            "false",
        ]
    )
    assert train_overrides(args) == {
        "train": {"micro_batch_size": 2, "global_batch_size": 64, "gradient_checkpointing": False},
        "optimization": {"compile": False},
        "data": {"init_args": {"train_data_path": "d/t"}},
        "devices": 2,
        "resume": False,
    }
    assert train_overrides(build_parser().parse_args([])) == {}


def test_dry_run_of_the_shipped_configs_explains_them(seeded):
    done = run(TRAIN_PY, "--dry-run", cwd=seeded)
    assert done.returncode == 0, done.stderr
    assert "only 4 optimizer steps will run" in done.stderr
    assert "the learning rate never reaches its peak" in done.stderr
    assert "no intermediate checkpoint" in done.stderr
    assert "549,146,880" in done.stdout  # params.total of MoE-200M
    assert "262,144" in done.stdout  # tokens actually trained
    assert "memory.total_cpu" in done.stdout and "memory.total_cuda" in done.stdout


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="the production preset's flash kernels can run on this GPU")
def test_dry_run_runs_the_engine_preflight(seeded):
    """The production preset forces flash-attention kernels: on this CPU-only machine the dry
    run fails like the real run would (exit 2, the field named), after printing the estimate."""
    done = run(TRAIN_PY, "--dry-run", "--preset", "production", cwd=seeded)
    assert done.returncode == 2, done.stderr
    assert "plan.optimizer_steps" in done.stdout
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: invalid_config: optimization.flash_attention_force: flash-attention kernels need a CUDA GPU"
        )
    )
    assert "Traceback" not in done.stderr


def test_smoke_test_then_flags_win(seeded):
    # --smoke-test sets micro 1 / global 1 / 64 tokens / seq 64; an explicit flag wins over it.
    done = run(
        TRAIN_PY,
        "--dry-run",
        "--smoke-test",
        "--max-seq-length",
        "32",
        "--max-tokens",
        "128",
        cwd=seeded,
    )
    assert done.returncode == 0, done.stderr
    lines = dict(
        line.split(None, 1) for line in done.stdout.splitlines()[1:] if line.startswith("  ")
    )
    assert lines["plan.seq_len"].strip() == "32"
    assert lines["plan.optimizer_steps"].strip() == "4"  # 128 tokens / (1 x 32) / accumulation 1


def test_invalid_flag_value_is_exit_2_naming_the_field():
    done = run("run_train.py", "--dry-run", "--micro-batch-size", "3")
    assert done.returncode == 2
    assert "train.global_batch_size" in done.stderr and "divisible" in done.stderr
    assert "Traceback" not in done.stderr


def test_typo_in_a_config_file_is_exit_2_with_a_suggestion(tmp_path):
    train = yaml.safe_load((REPO / "configs/train_config.yaml").read_text())
    train["train"]["micro_batch_szie"] = train["train"].pop("micro_batch_size")
    bad = tmp_path / "train.yaml"
    bad.write_text(yaml.safe_dump(train))
    done = run("run_train.py", "--dry-run", "--config", str(bad))
    assert done.returncode == 2
    assert "train.micro_batch_szie: unknown key; did you mean micro_batch_size?" in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_config_file_is_exit_2_naming_it(tmp_path):
    done = run("run_train.py", "--config", str(tmp_path / "absent.yaml"))
    assert done.returncode == 2
    assert "absent.yaml" in done.stderr
    assert "Traceback" not in done.stderr


def _leaf_parsers(parser: argparse.ArgumentParser, prefix: str = ""):
    """``(command, parser)`` for every subcommand of ``parser`` that has no subcommands."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix.strip(), parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaf_parsers(child, f"{prefix} {name}")


def test_every_command_runs_a_function_of_its_module():
    """Each subcommand names ``module:function`` of the cli package (imported when it runs);
    ``train`` alone is dispatched before parsing, to run_train.py's parser."""
    import importlib

    from cli.main import build_parser as moejobs_parser

    commands = dict(_leaf_parsers(moejobs_parser()))
    assert {"up", "submit", "validate", "tokenizer train", "train"} <= set(commands)
    for command, parser in commands.items():
        func = parser.get_default("func")
        if command == "train":
            assert func is None
            continue
        module, _, name = func.target.partition(":")
        assert callable(getattr(importlib.import_module(f"cli.{module}"), name)), command


def test_the_cli_loads_fastapi_only_for_the_http_commands_and_torch_only_to_train():
    """Parsing, and the modules of the commands that serve, run workers, validate and handle
    data, import neither FastAPI (``moejobs worker`` is a worker process) nor torch; the client
    commands (cli.runs) import FastAPI through the API's models, never torch."""
    code = (
        "import sys\n"
        "import cli.main, cli.server, cli.train, cli.data, cli.stack\n"
        "cli.main.build_parser()\n"
        "print(sorted(m for m in ('fastapi', 'torch') if m in sys.modules))\n"
        "import cli.runs\n"
        "print(sorted(m for m in ('fastapi', 'torch') if m in sys.modules))\n"
    )
    done = run("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "['fastapi']"]


def test_schema_command_prints_json_schema_with_descriptions():
    done = run("-m", "cli.main", "schema", "train")
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    assert "train" in schema["properties"]
    model = json.loads(run("-m", "cli.main", "schema", "model").stdout)
    assert "n_expert" in json.dumps(model)


def test_validate_command_with_preset(seeded):
    done = run(
        "-m",
        "cli.main",
        "validate",
        str(REPO / "configs/train_config.yaml"),
        str(REPO / "configs/model_config.yaml"),
        "--preset",
        "cpu-tiny",
        cwd=seeded,
    )
    assert done.returncode == 0, done.stderr
    assert "estimate:" in done.stdout


def test_rerunning_a_finished_run_says_there_is_nothing_to_train(tmp_path, corpus, tokenizer_dir):
    from tests.support.tiny import TINY_MODEL, tiny_train_config

    out = tmp_path / "run"
    train, model = tmp_path / "train.yaml", tmp_path / "model.yaml"
    train.write_text(
        yaml.safe_dump(tiny_train_config(out, corpus, tokenizer_dir, max_tokens=4 * 32 * 3))
    )
    model.write_text(yaml.safe_dump(TINY_MODEL))
    first = run("run_train.py", "--config", str(train), "--model-config", str(model))
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.splitlines()[0] == "training finished"

    again = run("run_train.py", "--config", str(train), "--model-config", str(model))
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout.splitlines()
    assert lines[0] == (
        "nothing to train: final/ is already at step 3 of 3; raise train.max_tokens "
        "(or use a new out_dir) to train more"
    ), again.stdout
    assert "training finished" not in again.stdout
    assert "  optimizer steps : 3" in lines


# -- one set of checks: the command line and the API say the same about unusable inputs ------------

#: The fix a missing data folder's message names (braces doubled: the cases are format strings).
DATA_HINT = (
    " (put .txt files there: `moejobs seed-data` writes a demo corpus, "
    "POST /datasets/{{name}} uploads one)"
)

#: field -> what the dry run, `moejobs validate` and /runs/validate say, for the folder layouts
#: below (paths relative to the data root, which is the command line's working folder).
INPUT_CASES: dict[str, tuple[dict, dict[str, str], int]] = {
    # nothing uploaded: tokenizer first, then the data, in the engine's order; exit 1 (invalid_data)
    "nothing": (
        {},
        {
            "tokenizer_dir": "{root}/tok: folder does not exist (train one with `moejobs tokenizer "
            "train`, or POST /tokenizers/{{name}} on the API)",
            "data.init_args.train_data_path": "{root}/ds/train: data folder does not exist"
            + DATA_HINT,
            "data.init_args.val_data_path": "{root}/ds/val: data folder does not exist" + DATA_HINT,
        },
        1,
    ),
    # an empty data folder, a tokenizer folder with no tokenizer in it
    "empty": (
        {"mkdir": ["ds/train", "tok"], "val": True},
        {
            "tokenizer_dir": "{root}/tok: holds neither tokenizer.json nor tokenizer.model",
            "data.init_args.train_data_path": "{root}/ds/train: no .txt files at the top level of this folder",
        },
        1,
    ),
    "initial weights": (
        {"data": True, "train": {"initial_checkpoint_dir": "base"}},
        {
            "initial_checkpoint_dir": "{root}/base: folder does not exist",
        },
        1,
    ),
    # the engine refuses a resume path that is no checkpoint as an invalid config: exit 2
    "resume path": (
        {"data": True, "train": {"resume": "old/step-00000010"}},
        {
            "resume": "{root}/old/step-00000010 is not a complete checkpoint folder (needs lit_model.pth, "
            "model_config.yaml, training_state.pt, training_state.json)",
        },
        2,
    ),
    "all there": ({"data": True}, {}, 0),
}


def _layout(root: Path, spec: dict, corpus: Path, tokenizer_dir: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for folder in spec.get("mkdir", []):
        (root / folder).mkdir(parents=True)
    if spec.get("val") or spec.get("data"):
        (root / "ds").mkdir(exist_ok=True)
        (root / "ds" / "val").symlink_to(corpus / "val", target_is_directory=True)
    if spec.get("data"):
        (root / "ds" / "train").symlink_to(corpus / "train", target_is_directory=True)
        (root / "tok").symlink_to(tokenizer_dir, target_is_directory=True)


def _error_lines(stderr: str) -> dict[str, str]:
    """``error: REASON: FIELD: message`` lines as {FIELD: message}."""
    out = {}
    for line in stderr.splitlines():
        if line.startswith("error: invalid_"):
            field, message = line.split(": ", 2)[2].split(": ", 1)
            out[field] = message
    return out


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_missing_inputs_are_the_same_problem_on_the_command_line_and_in_the_api(
    case, sqlite_api, corpus, tokenizer_dir, tmp_path
):
    """The dry run (and `moejobs validate`) in the data root fail with the exact messages that
    /runs/validate gives as warnings for the same config (paths from the working folder there,
    under DATA_ROOT here), with the exit code the real run would have."""
    from service.config.merge import deep_merge
    from tests.support.api import MODEL, TRAIN, body

    spec, expected, code = INPUT_CASES[case]
    root = sqlite_api.settings.data_root
    _layout(root, spec, corpus, tokenizer_dir)
    train = deep_merge(TRAIN, spec.get("train", {}))
    train_file, model_file = tmp_path / "train.yaml", tmp_path / "model.yaml"
    train_file.write_text(yaml.safe_dump(train))
    model_file.write_text(yaml.safe_dump(MODEL))
    expected = {k: v.format(root=root) for k, v in expected.items()}

    done = run(
        TRAIN_PY,
        "--dry-run",
        "--config",
        str(train_file),
        "--model-config",
        str(model_file),
        cwd=root,
    )
    assert done.returncode == code, done.stderr
    assert _error_lines(done.stderr) == expected
    assert "estimate:" in done.stdout and "Traceback" not in done.stderr
    if case == "nothing":  # `moejobs validate` is the same check
        validate = subprocess.run(
            [
                str(Path(sys.executable).parent / "moejobs"),
                "validate",
                str(train_file),
                str(model_file),
            ],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert validate.returncode == code, validate.stderr
        assert _error_lines(validate.stderr) == expected

    report = sqlite_api.client.post("/runs/validate", json=body(train_config=train)).json()
    assert report["valid"] is True, report  # the API warns: the data may come before the run starts
    warned = {".".join(w["loc"][2:]): w["msg"] for w in report["warnings"]}
    assert warned == expected


def test_a_real_run_fails_on_missing_data_with_the_dry_runs_message(tmp_path, tokenizer_dir):
    """The engine raises the same text (service.checks) when it meets the missing folder."""
    from tests.support.tiny import TINY_MODEL, tiny_train_config

    train = tiny_train_config(tmp_path / "out", tmp_path / "nowhere", tokenizer_dir)
    train_file, model_file = tmp_path / "train.yaml", tmp_path / "model.yaml"
    train_file.write_text(yaml.safe_dump(train))
    model_file.write_text(yaml.safe_dump(TINY_MODEL))
    argv = ("--config", str(train_file), "--model-config", str(model_file))
    dry, real = run(TRAIN_PY, "--dry-run", *argv), run(TRAIN_PY, *argv)
    message = f"{tmp_path}/nowhere/train: data folder does not exist" + DATA_HINT.replace(
        "{{", "{"
    ).replace("}}", "}")
    assert dry.returncode == real.returncode == 1, real.stderr[-2000:]
    assert (
        f"error: invalid_data: data.init_args.train_data_path: {message}" in dry.stderr.splitlines()
    )
    assert real.stderr.strip().splitlines()[-1] == f"error: invalid_data: {message}"


# -- settings errors: one line per problem naming the setting as written, exit 2 -------------------


def moejobs(*argv: str, tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    """``python -m cli.main ARGV`` with no MOEJOBS_* variable but ``variables`` (and a home
    under ``tmp_path`` unless given)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEJOBS_")}
    env.setdefault("MOEJOBS_HOME", str(tmp_path / "home"))
    env.update(variables)
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "command",
    [
        ["migrate"],
        ["serve"],
        ["worker"],
        ["up"],
        ["demo", "--skip-smoke-test", "--exit"],
        ["runs"],
        ["status", str(uuid.uuid4())],
        ["download", str(uuid.uuid4())],
    ],
)
def test_a_malformed_setting_is_one_line_naming_the_variable(tmp_path, command):
    done = moejobs(*command, tmp_path=tmp_path, MOEJOBS_PORT="abc")
    assert done.returncode == 2, done.stderr
    assert done.stderr == "error: MOEJOBS_PORT: expected an integer, got 'abc'\n"


def test_every_malformed_setting_gets_its_own_line(tmp_path):
    done = moejobs("migrate", tmp_path=tmp_path, MOEJOBS_PORT="abc", MOEJOBS_LEASE_SECONDS="soon")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: MOEJOBS_PORT: expected an integer, got 'abc'",
        "error: MOEJOBS_LEASE_SECONDS: expected a number, got 'soon'",
    ]


def test_an_unknown_database_scheme_lists_the_accepted_forms(tmp_path):
    done = moejobs(
        "migrate", tmp_path=tmp_path, MOEJOBS_DATABASE_URL="bogus://user:hunter2@db/moejobs"
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("error: MOEJOBS_DATABASE_URL: unsupported scheme 'bogus://'")
    assert "sqlite:///PATH" in line and "postgresql+psycopg://" in line and "postgresql://" in line
    assert "hunter2" not in line  # a URL's password is never repeated


def test_an_unknown_broker_scheme_is_named_before_celery_sees_it(tmp_path):
    done = moejobs("migrate", tmp_path=tmp_path, MOEJOBS_BROKER_URL="bogus://user:hunter2@mq/0")
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        "error: MOEJOBS_BROKER_URL: unsupported scheme 'bogus://'; use "
        "redis://HOST:6379/0 (production) or sqla+sqlite:///PATH (embedded), "
        "or another kombu transport\n"
    )
    for good in ("redis://127.0.0.1:6379/3", f"sqla+sqlite:///{tmp_path / 'b.sqlite3'}"):
        assert moejobs("migrate", tmp_path=tmp_path, MOEJOBS_BROKER_URL=good).returncode == 0, good


def test_a_home_that_cannot_be_created_names_the_flag_or_variable(tmp_path):
    done = moejobs("migrate", "--home", "/proc/nope", tmp_path=tmp_path)
    assert done.returncode == 2
    assert (
        done.stderr
        == "error: --home: cannot create the folder /proc/nope: No such file or directory\n"
    )
    (tmp_path / "a-file").write_text("")
    done = moejobs("migrate", tmp_path=tmp_path, MOEJOBS_HOME=str(tmp_path / "a-file" / "home"))
    assert done.returncode == 2
    assert done.stderr == (
        f"error: MOEJOBS_HOME: cannot create the folder {tmp_path / 'a-file' / 'home'}: "
        f"Not a directory\n"
    )


def test_an_unsafe_flag_is_named_as_written(tmp_path):
    done = moejobs("serve", "--host", "0.0.0.0", tmp_path=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(
        "error: --host=0.0.0.0 listens beyond this machine but no API token"
    )
    assert len(done.stderr.splitlines()) == 1
    done = moejobs("serve", "--host", "0.0.0.0", tmp_path=tmp_path, MOEJOBS_API_TOKEN="short-token")
    assert done.returncode == 2
    assert done.stderr.startswith(
        "error: --host=0.0.0.0 listens beyond this machine but MOEJOBS_API_TOKEN "
        "has 11 characters: it needs at least 32 there (make one with `python -c"
    )
    assert "short-token" not in done.stderr and len(done.stderr.splitlines()) == 1


def test_an_unreachable_database_is_one_line_without_the_password(tmp_path):
    done = moejobs(
        "migrate",
        tmp_path=tmp_path,
        MOEJOBS_DATABASE_URL="postgresql://nobody:hunter2@127.0.0.1:1/moejobs",
    )
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(
        "error: cannot reach the database of MOEJOBS_DATABASE_URL "
        "(postgresql+psycopg://nobody:***@127.0.0.1:1/moejobs): "
    )
    assert "hunter2" not in line


def test_serve_on_a_database_that_is_not_ready_is_one_line(tmp_path):
    """Not migrated, or unreachable: `moejobs serve` says what to do instead of uvicorn's
    start-up traceback, and does not start listening."""
    done = moejobs("serve", "--port", "8799", tmp_path=tmp_path)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("error: database sqlite:///") and "has no moejobs tables" in line
    assert "run `moejobs migrate`" in line
    done = moejobs(
        "serve",
        "--port",
        "8799",
        tmp_path=tmp_path,
        MOEJOBS_DATABASE_URL="postgresql://nobody:hunter2@127.0.0.1:1/moejobs",
    )
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(
        "error: database postgresql+psycopg://nobody:***@127.0.0.1:1/moejobs is unreachable"
    )
    assert "hunter2" not in line


def test_a_worker_on_an_unmigrated_database_exits_saying_so(tmp_path):
    """Celery swallows exceptions raised while a worker initialises; the check runs before
    Celery starts, so the worker exits instead of running without registering."""
    from service.db import head_revision

    done = moejobs("worker", tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].endswith(
        f"has no moejobs tables, but this code needs revision {head_revision()}: run `moejobs migrate` (or "
        "`moejobs up`, which migrates) and start the worker again"
    )


def test_validate_without_arguments_checks_the_shipped_configs_from_any_folder(tmp_path):
    """`moejobs validate` reads the shipped configs wherever it runs, as run_train.py does,
    and checks their relative input paths from the current folder (empty here: exit 1)."""
    done = run("-m", "cli.main", "validate", cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "file not found" not in done.stderr
    assert (
        f"error: invalid_data: data.init_args.train_data_path: {tmp_path}/data/custom_text/train: "
        f"data folder does not exist"
    ) in done.stderr
