"""The dashboard (service/static/): served by the real app, every asset local (no CDN, no URL
to another host), and, where a Chromium is installed, rendered headless against a server with
real runs, metrics, router rows, checkpoints and a log."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.datastructures import MutableHeaders

from service.api.middleware import PUBLIC_PATHS
from service.contract import append_event
from tests.support.client import (
    STATIC_DIR,
    finish_run,
    live_server,
    make_run,
    metric_rows,
    record_metrics,
    record_router,
    start_run,
    write_checkpoint,
    write_log,
)

URL_PATTERN = re.compile(r"\b(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}", re.IGNORECASE)


class _Refs(HTMLParser):
    """Collects src/href attribute values of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [value for name, value in attrs if name in ("src", "href") and value]


#: Where the browser posts its Content-Security-Policy violation reports in these tests.
REPORT_PATH = "/__csp-report"
#: The reports received (``csp-report`` objects), cleared by :func:`chromium` before each load.
CSP_REPORTS: list[dict] = []


class CspReportCollector:
    """Outer ASGI wrapper for the test servers: adds ``report-uri`` to the Content-Security-Policy
    the app sent (the app's own policy, unchanged otherwise) and collects what the browser reports
    there into :data:`CSP_REPORTS`. Unlike the console, reports include violations a script caught
    (an ``eval`` in a ``try``)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == REPORT_PATH and scope["method"] == "POST":
            body, more = b"", True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
            CSP_REPORTS.append(json.loads(body).get("csp-report", {}))
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return

        async def add_report_uri(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if "content-security-policy" in headers:
                    headers["content-security-policy"] += f"; report-uri {REPORT_PATH}"
            await send(message)

        await self.app(scope, receive, add_report_uri)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(tmp_path_factory.mktemp("dashboard"), wrap=CspReportCollector) as srv:
        yield srv


def test_index_and_its_assets_are_served_from_this_server(server):
    page = httpx.get(server.url + "/", timeout=30)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    parser = _Refs()
    parser.feed(page.text)
    assets = [r for r in parser.refs if not r.startswith(("#", "data:"))]
    assert sorted(assets) == ["static/app.css", "static/app.js"]
    types = {"static/app.css": "text/css", "static/app.js": "javascript"}
    for ref in assets:
        response = httpx.get(f"{server.url}/{ref}", timeout=30)
        assert response.status_code == 200, ref
        assert types[ref] in response.headers["content-type"]
        assert response.text == (STATIC_DIR / Path(ref).name).read_text()


def test_no_served_file_points_at_another_host():
    files = sorted(p for p in STATIC_DIR.rglob("*") if p.is_file())
    names = {p.relative_to(STATIC_DIR).as_posix() for p in files}
    assert {"index.html", "app.js", "app.css"} <= names
    # the rest are the ES modules app.js imports (js/*.js, js/pages/*.js)
    assert all(
        n.startswith("js/") and n.endswith(".js")
        for n in names - {"index.html", "app.js", "app.css"}
    )
    for path in files:
        text = path.read_text()
        assert not URL_PATTERN.search(text), f"{path.name}: {URL_PATTERN.search(text).group(0)}"
        assert "@import" not in text and "url(http" not in text


@pytest.mark.xfail(
    "/" not in PUBLIC_PATHS,
    reason="the dashboard page must load without the token (it holds no data and "
    "asks for the token itself): add '/' to PUBLIC_PATHS and '/static/' to "
    "PUBLIC_PREFIXES in service/api/errors.py",
    strict=True,
)
def test_the_run_statuses_of_the_page_are_the_service_s():
    """js/util.js spells out the run statuses and the terminal ones (it has no build step to
    import them): they are ``service.models.RunStatus`` and ``TERMINAL_STATUSES``, in that order."""
    from service.models import TERMINAL_STATUSES, RunStatus

    text = (STATIC_DIR / "js" / "util.js").read_text()
    statuses = re.search(r"^export const STATUSES = \[([^\]]*)\];$", text, re.M)
    terminal = re.search(r"^export const TERMINAL = new Set\(\[([^\]]*)\]\);$", text, re.M)
    assert statuses and terminal, "util.js no longer defines STATUSES and TERMINAL on one line each"
    assert re.findall(r"'(\w+)'", statuses.group(1)) == [s.value for s in RunStatus]
    terminal_names = re.findall(r"'(\w+)'", terminal.group(1))
    assert sorted(terminal_names) == sorted(s.value for s in TERMINAL_STATUSES)


def test_page_loads_without_the_token_but_the_data_needs_it(tmp_path):
    with live_server(tmp_path, token="dash-token") as srv:
        assert httpx.get(srv.url + "/runs", timeout=30).status_code == 401
        assert httpx.get(srv.url + "/", timeout=30).status_code == 200
        assert httpx.get(srv.url + "/static/app.js", timeout=30).status_code == 200


# -- headless browser ----------------------------------------------------------------------------

CHROMIUM = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)"
)


#: A console message in Chromium's log (``--enable-logging=stderr``):
#: ``[pid:tid:time:INFO:CONSOLE:0] "text", source: URL (line)`` (older builds: ``CONSOLE(0)``).
CONSOLE_LINE = re.compile(r":CONSOLE[:(]\d+\)?\] \"(?P<text>.*)\", source: (?P<source>.*)$")


def is_csp_violation(text: str) -> bool:
    """Whether a console message is Chromium's report of a Content-Security-Policy violation."""
    return "Content Security Policy" in text or "unsafe-eval" in text or "unsafe-inline" in text


def chromium_console(url: str, *args: str, budget_ms: int = 10000) -> tuple[str, list[str]]:
    """Load ``url`` headless (``budget_ms`` of virtual time lets the page's fetches and first
    polls run); return its stdout and every console message (``"text (source)"``)."""
    assert CHROMIUM is not None  # its callers are marked needs_chromium
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--virtual-time-budget={budget_ms}",
            "--enable-logging=stderr",
            "--v=0",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    console = [
        f"{m['text']} ({m['source']})"
        for m in map(CONSOLE_LINE.search, result.stderr.splitlines())
        if m
    ]
    return result.stdout, console


def chromium(url: str, *args: str) -> str:
    """:func:`chromium_console`'s stdout; fails on any Content-Security-Policy violation, in
    the console or reported to a :class:`CspReportCollector` server."""
    CSP_REPORTS.clear()
    out, console = chromium_console(url, *args)
    time.sleep(0.5)  # lets the server finish a report the browser sent just before it exited
    violations = [line for line in console if is_csp_violation(line)]
    violations += [
        f"{r.get('violated-directive')}: {r.get('blocked-uri')} ({r.get('source-file')}:"
        f"{r.get('line-number')})"
        for r in CSP_REPORTS
    ]
    assert not violations, f"{url}: Content-Security-Policy violations: {violations}"
    return out


@pytest.fixture(scope="module")
def finished_run(server) -> uuid.UUID:
    run_id = make_run(server, "dash-finished")
    attempt = start_run(server, run_id)
    record_metrics(server, run_id, metric_rows(1, 200), attempt=attempt)
    record_router(server, run_id, list(range(10, 201, 10)), collapse_layer=2)
    write_checkpoint(server, run_id, "step-00000100", 100)
    write_checkpoint(server, run_id, "final", 200)
    write_log(
        server,
        run_id,
        [
            "data: 25600 training tokens",
            "plan: 200 optimizer steps",
            "step 200 loss 2.61",
            "saved final checkpoint",
        ],
    )
    out = server.settings.run_dir(run_id) / "out"
    (out / "samples").mkdir()
    for name, text in (("step-00000100", " cat sat"), ("final", " cat sat on the <mat>")):
        doc = {"checkpoint": name, "samples": [{"prompt": "The", "text": text}]}
        (out / "samples" / f"{name}.json").write_text(json.dumps(doc))
    for kind in ("started", "configured", "data_ready", "model_built", "first_step"):
        append_event(out, kind, attempt=attempt)
    append_event(out, "checkpoint_written", attempt=attempt, step=100, message="step-00000100")
    finish_run(server, run_id, attempt=attempt)
    return run_id


@needs_chromium
def test_run_page_renders_charts_router_checkpoints_events_and_log(server, finished_run, tmp_path):
    run_id = finished_run
    dom = chromium(f"{server.url}/#/runs/{run_id}", "--window-size=1280,2400", "--dump-dom")
    assert "dash-finished" in dom
    assert 'class="badge succeeded big"' in dom
    # loss chart (train + validation), learning rate, tokens/s, grad norm: SVG polylines
    assert dom.count('class="series"') >= 5
    assert 'aria-label="loss vs step"' in dom
    # the router panel flags the collapsing layer 2 (expert 0 takes most tokens)
    assert re.search(r"layer 2</span><span class=\"flag\">e0 \d+%", dom), "no collapse flag"
    assert dom.count('class="router-cell"') == 4
    # checkpoints with archive links to this server, events, log tail
    assert f'href="/runs/{run_id}/checkpoints/final/archive"' in dom
    assert f'href="/runs/{run_id}/checkpoints/100/archive"' in dom
    assert f'href="/runs/{run_id}/checkpoints/final/archive?include=weights"' in dom
    assert f'href="/runs/{run_id}/checkpoints/final/archive?format=safetensors"' in dom
    # each checkpoint's samples side by side, as text (never as markup)
    assert "<b>The</b> cat sat</span>" in dom and "<b>The</b> cat sat on the &lt;mat&gt;" in dom
    assert "claimed by worker w-test" in dom
    # the engine's own events, in the same timeline
    assert "data ready" in dom and "model built" in dom
    assert "checkpoint written (step 100)" in dom
    assert dom.index("claimed by worker w-test") < dom.index("data ready")  # by time
    assert "saved final checkpoint" in dom
    assert "200 / 200" in dom
    shot = tmp_path / "run.png"
    chromium(f"{server.url}/#/runs/{run_id}", "--window-size=1280,2400", f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000


@needs_chromium
def test_runs_list_shows_progress_loss_and_workers(server, finished_run):
    live = make_run(server, "dash-live")
    attempt = start_run(server, live, worker="w-live")
    record_metrics(server, live, metric_rows(1, 40, seed=3), attempt=attempt)
    dom = chromium(server.url + "/", "--window-size=1280,900", "--dump-dom")
    assert "dash-live" in dom and "dash-finished" in dom
    assert "40 / 200" in dom and "200 / 200" in dom
    last_loss = metric_rows(1, 40, seed=3)[-1]["loss"]
    assert f"{last_loss:.4g}" in dom
    assert 'class="badge running"' in dom
    assert "w-live" in dom  # workers panel
    assert "Run smoke test" in dom


# -- the Content-Security-Policy in a browser ------------------------------------------------------


@needs_chromium
def test_every_view_and_the_docs_run_under_the_content_security_policy(server, finished_run):
    """Each page loads with the server's policy and the browser reports no violation
    (:func:`chromium` fails on one); the views and Swagger UI actually render."""
    views = {
        "/": "Run smoke test",
        "/#/workers": "w-test",
        "/#/smoke-test": "Run smoke test",
        f"/#/runs/{finished_run}": 'class="series"',
        "/docs": 'id="operations-tag-runs"',
    }
    for path, rendered in views.items():
        dom = chromium(server.url + path, "--window-size=1280,1600", "--dump-dom")
        assert rendered in dom, path
    # the docs' start-up code is a served script, not an inline one
    page = httpx.get(server.url + "/docs", timeout=30).text
    assert "<script>" not in page and '<script src="/docs/init.js"></script>' in page


@contextlib.contextmanager
def _policy_page(html: str, script: str):
    """A throwaway server with only the moejobs security headers, serving ``html`` at / and
    ``script`` at /page.js."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, Response
    from starlette.routing import Route

    from service.api.middleware import SecurityHeadersMiddleware

    app = CspReportCollector(
        SecurityHeadersMiddleware(
            Starlette(
                routes=[
                    Route("/", lambda _request: HTMLResponse(html)),
                    Route(
                        "/page.js", lambda _request: Response(script, media_type="text/javascript")
                    ),
                ]
            )
        )
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive()
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@needs_chromium
def test_the_policy_blocks_inline_script_eval_and_style_attributes_and_the_check_sees_it():
    """The control for the test above: the same policy on a page that breaks it is reported."""
    html = (
        '<!doctype html><p id="p" style="color: red">styled</p>'
        '<script>document.title = "inline ran";</script><script src="/page.js"></script>'
    )
    script = (
        'document.getElementById("p").style.fontWeight = "bold";\n'  # CSSOM: allowed
        'try { eval("document.title = \'eval ran\'"); } catch (e) { console.log("blocked: " + e.name); }\n'
        'try { new Function("return 1")(); } catch (e) { console.log("blocked: " + e.name); }\n'
    )
    with _policy_page(html, script) as url:
        CSP_REPORTS.clear()
        dom, console = chromium_console(url + "/", "--dump-dom", budget_ms=3000)
        time.sleep(0.5)
        reported = sorted((r["violated-directive"], r["blocked-uri"]) for r in CSP_REPORTS)
    assert "<title>" not in dom  # neither the inline script nor eval set a title
    assert reported == [
        ("script-src", "eval"),
        ("script-src", "eval"),
        ("script-src-elem", "inline"),
        ("style-src-attr", "inline"),
    ]
    violations = [line for line in console if is_csp_violation(line)]
    assert any("inline script" in v for v in violations), console
    assert any("inline style" in v for v in violations), console
    assert sum(line.startswith("blocked: EvalError") for line in console) == 2, console
    with pytest.raises(
        AssertionError, match="Content-Security-Policy violations: .*script-src-elem"
    ):
        with _policy_page(html, script) as url:
            chromium(url + "/")
