"""docker/ and compose.yaml agree with the code (Docker itself is not needed): every worker
service owns one distinct GPU, the MOEJOBS_* variables are real settings, the commands are
real `moejobs` subcommands, and nothing in an image is removed by a later install step."""

from __future__ import annotations

import re

import yaml

from cli.main import build_parser
from service.settings import ENV_PREFIX, Settings
from tests.support import REPO


def _compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_each_worker_service_is_pinned_to_its_own_gpu():
    services = _compose()["services"]
    workers = {name: svc for name, svc in services.items() if name.startswith("worker")}
    assert len(workers) >= 2
    gpus = []
    for name, svc in workers.items():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device, f"{name}: a count gives every replica the same GPU"
        (gpu,) = device["device_ids"]
        gpus.append(gpu)
    assert sorted(gpus, key=int) == [str(i) for i in range(len(workers))]


def test_compose_variables_and_commands_exist():
    doc = _compose()
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    for name, svc in doc["services"].items():
        for key in svc.get("environment") or {}:
            if key.startswith(ENV_PREFIX):
                assert key in fields, f"{name}: {key} is not a setting"
        command = svc.get("command")
        if command and command[0] == "moejobs":
            assert command[1] in subcommands, f"{name}: moejobs {command[1]}"
    for dockerfile in (REPO / "docker").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        for key in re.findall(r"\b(MOEJOBS_[A-Z_]+)=", text):
            assert key in fields, f"{dockerfile.name}: {key} is not a setting"
        cmd = re.search(r'^CMD \["moejobs", "(\w[\w-]*)"', text, re.M)
        assert cmd and cmd.group(1) in subcommands, dockerfile.name


def test_flash_attn_is_installed_after_the_last_uv_sync():
    lines = (REPO / "docker" / "worker.Dockerfile").read_text().splitlines()
    syncs = [i for i, line in enumerate(lines) if "uv sync" in line and line.startswith("RUN")]
    flash = [i for i, line in enumerate(lines) if "flash-attn" in line and line.startswith("RUN")]
    assert syncs and flash and min(flash) > max(syncs), "uv sync removes packages not in the lock"


def test_docker_build_context_leaves_out_environments_and_outputs():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "checkpoints", "out"} <= set(ignored)


def test_gpu_workers_train_and_one_aux_worker_prepares_data():
    services = _compose()["services"]
    workers = {name: svc for name, svc in services.items() if name.startswith("worker")}
    assert {svc["environment"]["MOEJOBS_WORKER_ROLE"] for svc in workers.values()} == {"train"}
    aux = services["aux"]
    assert aux["environment"]["MOEJOBS_WORKER_ROLE"] == "aux"
    assert "deploy" not in aux, "the aux worker needs no GPU"
    assert aux["volumes"] == workers["worker-0"]["volumes"], "it fills the shared token cache"
