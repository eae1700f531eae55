"""Schemathesis over every operation of the OpenAPI document, against a real server.

The server is ``uvicorn --factory service.main:create_app`` in a subprocess on a migrated SQLite
file in a throwaway home, with an API token, ``MOEJOBS_ALLOW_UNSCHEDULABLE=true`` and no worker.
Schemathesis (its command line, ``python -m schemathesis.cli run``) generates requests for every
operation (examples, coverage, fuzzing and stateful phases, valid and invalid data) and checks
each answer: ``not_a_server_error``, ``status_code_conformance`` (every status is declared),
``response_schema_conformance`` (bodies match their declared schema, errors included) and
``content_type_conformance``. Zero failures.

``GET /readyz`` answers 503 by design here (no worker is live): that one status is expected of
that one operation, declared in the document, and still checked against its schema.

Examples per operation: ``MOEJOBS_SCHEMATHESIS_EXAMPLES`` (default 25, what CI runs; 50 or more
by hand, README "Limits of every input"); the seed ``MOEJOBS_SCHEMATHESIS_SEED`` (default fixed,
so a failure reproduces).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from service.db import migrate
from tests.service.api.test_load import Server
from tests.support.db import settings_for

EXAMPLES = int(os.environ.get("MOEJOBS_SCHEMATHESIS_EXAMPLES", "25"))
SEED = int(os.environ.get("MOEJOBS_SCHEMATHESIS_SEED", "20261203"))
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "response_schema_conformance",
    "content_type_conformance",
)
TOKEN = "schemathesis-" + "x" * 40

#: Schemathesis configuration: the token header and /readyz's expected 503.
CONFIG = """\
headers = { Authorization = "Bearer ${MOEJOBS_ST_TOKEN}" }

[[operations]]
include-name = "GET /readyz"
checks.not_a_server_error.expected-statuses = ["2XX", "4XX", 503]
"""


@pytest.fixture
def server(tmp_path: Path):
    settings = settings_for(tmp_path, allow_unschedulable=True)
    migrate(settings)
    settings.api_token = SecretStr(TOKEN)
    srv = Server(settings, tmp_path / "server.log")
    try:
        yield srv
    finally:
        srv.stop()


def test_schemathesis_finds_no_failure_on_any_operation(server: Server, tmp_path: Path):
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(EXAMPLES),
        "--seed",
        str(SEED),
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--no-color",
        "--request-timeout",
        "30",
    ]
    env = {**os.environ, "MOEJOBS_ST_TOKEN": TOKEN}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    tail = output[-12000:]
    assert result.returncode == 0, (
        f"schemathesis failed:\n{tail}\n--- server log ---\n{server.text()[-6000:]}"
    )
    selected = re.search(r"Selected: (\d+)/(\d+)", output)
    tested = re.search(r"Tested: (\d+)", output)
    assert selected and tested, tail
    assert int(tested.group(1)) == int(selected.group(1)) == int(selected.group(2)) >= 29, tail
    assert re.search(r"\d+ generated, \d+ passed", output), tail
    assert "Internal error" not in server.text() and "unhandled error" not in server.text()
