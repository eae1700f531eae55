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


# -- the object store (issue 12) ----------------------------------------------------------------


#: The services that read or write artifacts: the API, the one-shot bucket job, every worker.
def _store_clients(services: dict) -> dict[str, dict]:
    return {
        name: svc
        for name, svc in services.items()
        if name in ("api", "aux", "bucket") or name.startswith("worker")
    }


#: Credentials committed in compose.yaml: dev defaults only, each one named in the README.
DEV_DEFAULTS = {"moejobs", "moejobs-dev", "moejobs-dev-secret"}
_SECRET_KEY = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY")
_INTERPOLATION = re.compile(r"^\$\{(\w+)(?:(:?[-?])(.*))?\}$")


def test_compose_runs_an_s3_store_and_creates_its_bucket_before_anyone_uses_it():
    services = _compose()["services"]
    store = services["store"]
    image, _, tag = store["image"].partition(":")
    assert image == "chrislusf/seaweedfs" and tag and tag != "latest", "a pinned SeaweedFS"
    assert store["command"][0] == "server" and "-s3" in store["command"]
    assert any(v.endswith(":/data") for v in store["volumes"]), "objects outlive the container"
    assert "8333:8333" in store["ports"], "browsers follow presigned links to it"
    bucket = services["bucket"]
    assert bucket["command"][:3] == ["python", "-m", "service.artifacts"]
    from service import artifacts

    assert callable(artifacts.main)
    assert bucket["depends_on"]["store"]["condition"] == "service_started"
    assert bucket.get("restart") == "no"
    for name, svc in _store_clients(services).items():
        if name != "bucket":
            assert svc["depends_on"]["bucket"]["condition"] == "service_completed_successfully", (
                name
            )


def test_every_service_that_reaches_the_store_has_its_settings():
    services = _compose()["services"]
    for name, svc in _store_clients(services).items():
        env = svc["environment"]
        for key in ("MOEJOBS_ARTIFACT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"):
            assert key in env, f"{name}: {key}"
        assert "AWS_SECRET_ACCESS_KEY" in env, name
        default = _INTERPOLATION.match(env["MOEJOBS_ARTIFACT_URL"])
        assert default and default.group(3), f"{name}: the store is the default artifact location"
        Settings(artifact_url=default.group(3))  # a valid setting
        endpoint = _INTERPOLATION.match(env["AWS_ENDPOINT_URL"])
        assert endpoint and endpoint.group(3) == "http://store:8333", name
        # the store and its clients share one pair of credentials
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == services["store"]["environment"][key], f"{name}: {key}"
    public = services["api"]["environment"]["MOEJOBS_ARTIFACT_PUBLIC_URL"]
    match = _INTERPOLATION.match(public)
    assert match and match.group(3) == "http://localhost:8333", "browsers cannot resolve `store`"


def test_no_secret_is_committed_beyond_the_documented_dev_defaults():
    readme = (REPO / "README.md").read_text()
    for default in DEV_DEFAULTS:
        assert f"`{default}`" in readme or default == "moejobs", f"README names {default}"
    for name, svc in _compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            text = str(value)
            for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", text):  # URL userinfo
                assert password in DEV_DEFAULTS, f"{name}: {key} holds a password"
            if not _SECRET_KEY.search(key):
                continue
            match = _INTERPOLATION.match(text)
            if match is None:
                assert text in DEV_DEFAULTS, f"{name}: {key} is a literal secret"
            elif match.group(2) in ("-", ":-"):
                assert match.group(3) in DEV_DEFAULTS, f"{name}: {key} defaults to a secret"
    for dockerfile in (REPO / "docker").glob("*.Dockerfile"):
        text = dockerfile.read_text()
        assert not re.search(r"\b\w*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)\w*=", text), dockerfile.name
