"""Security headers (service.api.middleware) on every kind of response of a real server: the
dashboard and its assets, the API, the docs and the schema, probes, and the errors of every
layer (401 and 403 from the token check, 404, 405, 413 from the body limit, 422, and the 500 of
the error middleware). The browser side (the pages run under the policy) is in tests/service/test_dashboard.py."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest

from service.api.middleware import CONTENT_SECURITY_POLICY, SECURITY_HEADERS
from tests.support import REPO
from tests.support.client import live_server

TOKEN = "t" * 40


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(tmp_path_factory.mktemp("headers"), token=TOKEN) as srv:

        async def boom() -> None:
            raise RuntimeError("a bug")

        srv.app.add_api_route("/__boom", boom)  # routes are looked up per request
        yield srv


def _directives(policy: str) -> dict[str, list[str]]:
    out = {}
    for part in policy.split(";"):
        name, *values = part.split()
        out[name] = values
    return out


def test_the_policy_allows_only_this_server_and_no_inline_script_or_eval():
    d = _directives(CONTENT_SECURITY_POLICY)
    assert d["script-src"] == ["'self'"]
    assert d["frame-ancestors"] == ["'none'"]
    assert d["object-src"] == ["'none'"] and d["base-uri"] == ["'none'"]
    assert d["default-src"] == d["style-src"] == d["connect-src"] == ["'self'"]
    assert d["img-src"] == ["'self'", "data:"]
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert SECURITY_HEADERS["X-Content-Type-Options"] == "nosniff"
    assert SECURITY_HEADERS["X-Frame-Options"] == "DENY"
    assert SECURITY_HEADERS["Referrer-Policy"] == "no-referrer"


AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: (method, path, request headers, body, expected status)
CASES = [
    ("GET", "/", {}, None, 200),
    ("GET", "/static/app.js", {}, None, 200),
    ("GET", "/static/app.css", {}, None, 200),
    ("GET", "/static/nothing.js", {}, None, 404),
    ("GET", "/docs", {}, None, 200),
    ("GET", "/docs/init.js", {}, None, 200),
    ("GET", "/docs/assets/swagger-ui-bundle.js", {}, None, 200),
    ("GET", "/docs/assets/swagger-ui.css", {}, None, 200),
    ("GET", "/docs/assets/not-there.js", {}, None, 404),
    ("GET", "/openapi.json", {}, None, 200),
    ("GET", "/redoc", {}, None, 401),  # not served: an unknown path needs the token first
    ("GET", "/redoc", AUTH, None, 404),
    ("GET", "/healthz", {}, None, 200),
    ("GET", "/runs", {}, None, 401),
    ("GET", "/runs", {"Authorization": "Bearer wrong"}, None, 403),
    ("GET", "/runs", AUTH, None, 200),
    ("GET", f"/runs/{uuid.uuid4()}", AUTH, None, 404),
    ("GET", "/runs/not-a-uuid", AUTH, None, 422),
    ("DELETE", "/healthz", {}, None, 405),
    ("POST", "/runs/validate", {**AUTH, "Content-Type": "application/json"}, b"x" * (2 << 20), 413),
    ("GET", "/__boom", AUTH, None, 500),
]


@pytest.mark.parametrize(
    "method, path, headers, body, status", CASES, ids=[f"{c[0]} {c[1]} {c[4]}" for c in CASES]
)
def test_every_response_carries_the_security_headers(server, method, path, headers, body, status):
    response = httpx.request(method, server.url + path, headers=headers, content=body, timeout=60)
    assert response.status_code == status, response.text[:300]
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get_list(name) == [value], name


def test_the_docs_page_runs_no_inline_script(server):
    page = httpx.get(server.url + "/docs", timeout=30).text
    assert page.count("<script") == 2 and "<script>" not in page
    assert (
        not re.search(r"\son[a-z]+\s*=", page) and "style=" not in page
    )  # no handler, no inline style
    assert '<script src="/docs/assets/swagger-ui-bundle.js"></script>' in page
    assert '<script src="/docs/init.js"></script>' in page
    init = httpx.get(server.url + "/docs/init.js", timeout=30)
    assert init.headers["content-type"].startswith("text/javascript")
    assert "SwaggerUIBundle(config)" in init.text and "eval" not in init.text


def test_the_readme_states_the_policy_served():

    readme = (REPO / "README.md").read_text()
    assert f"| `Content-Security-Policy` | `{CONTENT_SECURITY_POLICY}` |" in readme
    for name, value in SECURITY_HEADERS.items():
        assert f"| `{name}` | `{value}`" in readme, name
