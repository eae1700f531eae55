"""Hostile input: what once answered 500 or was accepted loosely is a 4xx naming the field and
the limit, on SQLite and PostgreSQL (where NUL characters and over-long strings fail in the
database, not in Python). The OpenAPI document declares every status with the error schema.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import tarfile
from typing import Any

import pytest

from service.config.paths import NAME_MAX_BYTES, NAME_REGEX, PATH_MAX_BYTES, check_name
from service.submission import RunCreate
from tests.support.api import ApiEnv, body

PATH_FIELDS = [
    ("tokenizer_dir",),
    ("data", "init_args", "train_data_path"),
    ("data", "init_args", "val_data_path"),
    ("resume",),
    ("initial_checkpoint_dir",),
]


def _with(path: tuple[str, ...], value: Any, doc: str = "train_config") -> dict:
    out = copy.deepcopy(body())
    node = out[doc]
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return out


def _errors(response) -> dict[tuple, str]:
    return {tuple(e["loc"]): e["msg"] for e in response.json()["errors"]}


# -- the seven 500s -------------------------------------------------------------------------------


@pytest.mark.parametrize("field", PATH_FIELDS, ids=lambda f: ".".join(f))
@pytest.mark.parametrize(
    "value,limit",
    [
        ("a/" * 3000, "at most 4,095 characters"),
        ("a/" * 2040, f"{PATH_MAX_BYTES:,} bytes (PATH_MAX)"),
        ("x" * 300, f"{NAME_MAX_BYTES} bytes (NAME_MAX)"),
    ],
    ids=["over-4095-chars", "over-PATH_MAX-once-joined", "over-NAME_MAX"],
)
def test_over_long_paths_are_422s_naming_field_and_limit(
    shared_sqlite_api: ApiEnv, field, value, limit
):
    doc = _with(field, value)
    if field == ("resume",):
        doc["train_config"].pop("initial_checkpoint_dir", None)
    r = shared_sqlite_api.client.post("/runs", json=doc)
    assert r.status_code == 422, r.text
    msg = _errors(r)[("body", "train_config", *field)]
    assert limit in msg, msg
    # /runs/validate reports the same instead of crashing
    r = shared_sqlite_api.client.post("/runs/validate", json=doc)
    assert r.status_code == 200 and r.json()["valid"] is False


@pytest.mark.parametrize("dataset,limit", [("a" * 299, "NAME_MAX"), ("a" * 312, "at most 300")])
def test_an_over_long_tokenizer_dataset_is_a_422(shared_sqlite_api: ApiEnv, dataset, limit):
    r = shared_sqlite_api.client.post("/tokenizers/tok", json={"dataset": dataset})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == ["body", "dataset"]
    assert limit in r.json()["errors"][0]["msg"]


@pytest.mark.parametrize("where", ["name", "model_name", "log_project", "hf_config"])
def test_nul_characters_are_422s_on_every_database(api: ApiEnv, where):
    doc = body()
    loc: tuple[str, ...]
    if where == "name":
        doc["name"] = "a\x00b"
        loc = ("body", "name")
    elif where == "model_name":
        doc["model_config"] = {**doc["model_config"], "name": "tiny\x00"}
        loc = ("body", "model_config", "name")
    elif where == "log_project":
        doc = _with(("log", "project"), "p\x00")
        loc = ("body", "train_config", "log", "project")
    else:
        doc["model_config"] = {**doc["model_config"], "hf_config": {"org": "\x00"}}
        loc = ("body", "model_config", "hf_config", "org")
    r = api.client.post("/runs", json=doc)
    assert r.status_code == 422, r.text
    assert "NUL" in _errors(r)[loc] or "control characters" in _errors(r)[loc]
    assert api.client.get("/runs").json()["items"] == []


def _yaml_body(train_extra: str = "", model_extra: str = "") -> bytes:
    import yaml

    text = yaml.safe_dump(body(), sort_keys=False)
    text = text.replace("train_config:\n", "train_config:\n" + train_extra, 1)
    return text.replace("model_config:\n", "model_config:\n" + model_extra, 1).encode()


@pytest.mark.parametrize(
    "train_extra,model_extra,loc,msg",
    [
        (
            "  log:\n    metadata:\n      day: 2020-01-01\n",
            "",
            ["train_config", "log", "metadata", "day"],
            "a date is not a JSON value",
        ),
        (
            "  log:\n    metadata:\n      raw: !!binary aGVsbG8=\n",
            "",
            ["train_config", "log", "metadata", "raw"],
            "a bytes is not a JSON value",
        ),
        ("", "  hf_config: {1: a}\n", ["model_config", "hf_config", "1"], "keys must be strings"),
        (
            "",
            "  rope_adjustments: {factor: .nan}\n",
            ["model_config", "rope_adjustments", "factor"],
            "must be a finite number, got nan",
        ),
        (
            "",
            "  hf_config: {a: " + "[" * 40 + "]" * 40 + "}\n",
            None,
            "nested deeper than 32 levels",
        ),
        ("", "  hf_config: {a: " + "9" * 5000 + "}\n", ["body"], "invalid YAML: Exceeds the limit"),
    ],
    ids=["date", "binary", "int-key", "nan", "deep", "huge-int"],
)
def test_documents_that_are_not_plain_json_are_422s(
    api: ApiEnv, train_extra, model_extra, loc, msg
):
    """YAML reads more than JSON holds; what no database stores is refused, naming where
    (these were 500s when the run was stored)."""
    r = api.client.post(
        "/runs",
        content=_yaml_body(train_extra, model_extra),
        headers={"Content-Type": "application/yaml"},
    )
    assert r.status_code == 422, r.text
    error = r.json()["errors"][0]
    assert msg in error["msg"], error
    if loc == ["body"]:
        assert error["loc"] == loc
    elif loc is not None:
        assert error["loc"] == ["body", *loc]
    else:
        assert error["loc"][:4] == ["body", "model_config", "hf_config", "a"]
    assert api.client.get("/runs").json()["items"] == []


def test_a_nan_in_json_is_refused_where_it_is(shared_sqlite_api: ApiEnv):
    text = json.dumps(body()).replace(
        '"model_config": {', '"model_config": {"hf_config": {"x": [1, NaN]}, ', 1
    )
    r = shared_sqlite_api.client.post(
        "/runs", content=text.encode(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422
    assert r.json()["errors"] == [
        {
            "loc": ["body", "model_config", "hf_config", "x", 1],
            "msg": "must be a finite number, got nan",
            "type": "invalid_config",
        }
    ]


# -- loose input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["line\nbreak", "tab\there", "esc\x1b[31m", "del\x7f", "c1\x85", "sep\u2028"]
)
def test_control_characters_in_names_are_refused(shared_sqlite_api: ApiEnv, name):
    c = shared_sqlite_api.client
    r = c.post("/runs", json=body(name=name))
    assert r.status_code == 422 and "control characters" in _errors(r)[("body", "name")]
    doc = body()
    doc["model_config"] = {**doc["model_config"], "name": name}
    r = c.post("/runs/validate", json=doc)
    errors = {tuple(e["loc"]): e["msg"] for e in r.json()["errors"]}
    assert "control characters" in errors[("body", "model_config", "name")]


def test_names_are_bounded_by_their_column(shared_sqlite_api: ApiEnv):
    c = shared_sqlite_api.client
    assert c.post("/runs", json=body(name="n" * 201)).status_code == 422
    doc = body()
    doc["model_config"] = {**doc["model_config"], "name": "m" * 500_000}
    r = c.post("/runs/validate", json=doc)
    assert {
        "loc": ["body", "model_config", "name"],
        "msg": "at most 200 characters, got 500,000",
    }.items() <= r.json()["errors"][0].items()
    doc["model_config"]["name"] = "m" * 200
    assert c.post("/runs/validate", json=doc).json()["valid"] is True


@pytest.mark.parametrize(
    "path,value",
    [
        (("train", "save_interval"), True),
        (("train", "micro_batch_size"), False),
        (("train", "max_tokens"), True),
        (("optimizer", "init_args", "lr"), True),
        (("train", "min_lr"), False),
        (("seed",), True),
        (("num_nodes",), True),
    ],
)
def test_a_boolean_is_never_a_number(shared_sqlite_api: ApiEnv, path, value):
    r = shared_sqlite_api.client.post("/runs/validate", json=_with(path, value))
    errors = {tuple(e["loc"]): e["msg"] for e in r.json()["errors"]}
    assert "a boolean is not a number" in errors[("body", "train_config", *path)], r.text


def test_boolean_lists_and_fractional_integers_are_refused_integral_floats_kept(
    shared_sqlite_api: ApiEnv,
):
    c = shared_sqlite_api.client
    doc = body()
    doc["model_config"] = {**doc["model_config"], "sliding_window_indices": [True, False]}
    r = c.post("/runs/validate", json=doc)
    assert "a boolean is not a number" in r.json()["errors"][0]["msg"]
    r = c.post("/runs/validate", json=_with(("train", "micro_batch_size"), 2.5))
    assert r.json()["errors"][0]["msg"] == "expected an integer, got 2.5"
    r = c.post("/runs/validate", json=_with(("train", "max_tokens"), 2.56e3))
    assert r.json()["valid"] is True
    assert r.json()["resolved"]["train_config"]["train"]["max_tokens"] == 2560
    r = c.post("/tokenizers/tok", json={"dataset": "ds", "vocab_size": True})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "vocab_size"]


def _upload(client, name: str, files: dict[str, bytes]):
    return client.post(
        f"/datasets/{name}", files=[("files", (n, data, "text/plain")) for n, data in files.items()]
    )


def test_a_newline_in_an_upload_file_name_is_refused(sqlite_api: ApiEnv):
    """A raw line feed inside the multipart header's file name (clients escape it; an
    attacker's raw request does not)."""
    raw = (
        b'--XX\r\nContent-Disposition: form-data; name="files"; filename="a\nb.txt"\r\n'
        b"Content-Type: text/plain\r\n\r\nhello\r\n--XX--\r\n"
    )
    r = sqlite_api.client.post(
        "/datasets/ds", content=raw, headers={"Content-Type": "multipart/form-data; boundary=XX"}
    )
    assert r.status_code == 422, r.text
    assert r.json()["errors"] == [
        {
            "loc": ["body", "a\nb.txt"],
            "type": "invalid_upload",
            "msg": "control characters are not allowed in a file name (found U+000A)",
        }
    ]
    assert not sqlite_api.data_root.joinpath("ds").exists()


@pytest.mark.parametrize(
    "filename,data,reason",
    [
        ("esc\x1b.txt", b"text", "control characters"),
        ("x" * 300 + ".txt", b"text", "NAME_MAX"),
        ("zeros.txt", b"\x00" * 4096, "NUL byte at byte 0"),
        ("mixed.txt", b"some text\x00\x01\x02 then binary", "NUL byte at byte 9"),
        ("blank.txt", b" \n\t\r\n", "only whitespace"),
        # Unicode whitespace (ideographic space, no-break space): the engine's str.strip drops it
        ("wide-blank.txt", "\u3000\u00a0\n\u2003".encode(), "only whitespace"),
    ],
)
def test_refused_upload_files_are_named(sqlite_api: ApiEnv, filename, data, reason):
    r = _upload(sqlite_api.client, "ds", {"good.txt": b"fine text\n", filename: data})
    assert r.status_code == 422, r.text
    error = r.json()["errors"][0]
    assert error["loc"] == ["body", filename] and reason in error["msg"], error
    assert not sqlite_api.data_root.joinpath("ds").exists()


def test_a_tar_member_with_a_control_character_is_refused(sqlite_api: ApiEnv):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("train/a\rb.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"text"))
    r = sqlite_api.client.post(
        "/datasets/ds", content=buffer.getvalue(), headers={"Content-Type": "application/x-tar"}
    )
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "train/a\rb.txt"]


def _cursor(value: Any) -> str:
    raw = json.dumps([value, "00000000-0000-0000-0000-000000000000"]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "sort,value", [("name", "a\x00"), ("name", "\ud800"), ("created_at", "2026-01-01T00:00:00")]
)
def test_crafted_cursors_are_422s(api: ApiEnv, sort, value):
    r = api.client.get("/runs", params={"sort": sort, "cursor": _cursor(value)})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == ["query", "cursor"]


def test_a_checkpoint_reference_with_a_nul_is_a_404(api: ApiEnv):
    run_id = api.client.post("/runs", json=body()).json()["id"]
    for ref in ("a%00b", "step-%00", "%C3%A9"):
        r = api.client.get(f"/runs/{run_id}/checkpoints/{ref}/archive")
        assert r.status_code == 404, r.text


# -- the OpenAPI document -------------------------------------------------------------------------


def test_every_operation_declares_its_errors_with_the_error_schema(shared_sqlite_api: ApiEnv):
    doc = shared_sqlite_api.client.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(doc)
    error_schema = doc["components"]["schemas"]["ErrorBody"]
    assert error_schema["required"] == ["code", "message"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            statuses = set(op["responses"])
            assert "500" in statuses, (method, path)
            if op.get("security"):
                assert {"401", "403"} <= statuses, (method, path)
            if "requestBody" in op:
                assert {"400", "413", "422"} <= statuses, (method, path)
            for status, answer in op["responses"].items():
                if status[0] in "45":
                    assert answer["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorBody"
                    }, (method, path, status)
    runs = doc["paths"]["/runs"]["post"]["responses"]
    assert {"201", "409", "413", "415", "422", "503"} <= set(runs)
    assert {"404", "503"} <= set(doc["paths"]["/runs/{run_id}"]["get"]["responses"])
    assert "410" in doc["paths"]["/runs/{run_id}/checkpoints/{ref}/archive"]["get"]["responses"]


def test_name_patterns_in_the_document_equal_what_the_api_accepts(shared_sqlite_api: ApiEnv):
    doc = shared_sqlite_api.client.get("/openapi.json").json()
    for path in ("/datasets/{name}", "/tokenizers/{name}"):
        for op in doc["paths"][path].values():
            (param,) = [p for p in op["parameters"] if p["name"] == "name"]
            assert param["schema"]["pattern"] == NAME_REGEX and param["schema"]["maxLength"] == 64
    pattern = re.compile(NAME_REGEX)
    for name in [
        "a",
        "a.b",
        "a..b",
        "..",
        ".a",
        "a.",
        "0-_.x",
        "A",
        "a b",
        "a/b",
        "é",
        "a" * 64,
        "a" * 65,
        "a._-.",
        "a.-",
        "-a",
        "_a",
    ]:
        try:
            check_name(name)
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == bool(pattern.match(name) and len(name) <= 64), name
        if name not in ("..", "a/b"):  # the URL itself would change
            r = shared_sqlite_api.client.delete(f"/datasets/{name}")
            assert r.status_code == (404 if accepted else 422), (name, r.status_code)


def test_the_run_example_in_the_document_is_valid(shared_sqlite_api: ApiEnv):
    doc = shared_sqlite_api.client.get("/openapi.json").json()
    example = doc["paths"]["/runs"]["post"]["requestBody"]["content"]["application/json"]["example"]
    RunCreate.model_validate(example)
    r = shared_sqlite_api.client.post("/runs/validate", json=example)
    assert r.json()["valid"] is True, r.text


def test_the_name_text_pattern_in_the_document_is_the_check():
    """``NAME_TEXT_REGEX`` (what the document says of names) refuses exactly the code points
    ``check_name_text`` refuses but lone surrogates, which the check refuses too (fullmatch:
    JSON Schema's ``$`` does not match before a final newline as Python's does)."""
    from service.config.fields import NAME_TEXT_REGEX, check_name_text

    pattern = re.compile(NAME_TEXT_REGEX)
    for cp in range(0x110000):
        c = chr(cp)
        try:
            check_name_text(c)
            accepted = True
        except ValueError:
            accepted = False
        surrogate = 0xD800 <= cp <= 0xDFFF
        assert accepted == (bool(pattern.fullmatch(c)) and not surrogate), hex(cp)
