"""The dashboard's pages in a headless Chromium driven over the DevTools protocol
(``tests.support.browser``): the run editor, clone, delete, CSV export, loss smoothing and the
smoke-test list, each against the real app with real rows; and every page loads only this
server's scripts and runs under the Content-Security-Policy without an error."""

from __future__ import annotations

import json
import time
import uuid
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from service.contract import append_event
from tests.service.test_dashboard import CSP_REPORTS, CspReportCollector
from tests.support.browser import CHROMIUM, Browser, browser
from tests.support.client import (
    MODEL,
    TRAIN,
    finish_run,
    live_server,
    make_run,
    metric_rows,
    record_metrics,
    start_run,
)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(tmp_path_factory.mktemp("dashboard-pages"), wrap=CspReportCollector) as srv:
        yield srv


@pytest.fixture(scope="module")
def page():
    with browser() as b:
        yield b


@pytest.fixture
def clean(page: Browser):
    """The page's problems and the server's CSP reports start empty; none may be left after."""
    page.problems.clear()
    CSP_REPORTS.clear()
    yield page
    assert not page.problems, page.problems
    assert not CSP_REPORTS, CSP_REPORTS


def finished(server, name: str, steps: int = 120) -> uuid.UUID:
    run_id = make_run(server, name)
    attempt = start_run(server, run_id)
    record_metrics(server, run_id, metric_rows(1, steps), attempt=attempt)
    append_event(server.settings.run_dir(run_id) / "out", "started", attempt=attempt)
    finish_run(server, run_id, attempt=attempt)
    return run_id


def set_text(page: Browser, selector: str, text: str) -> None:
    """Type ``text`` into a field as a user's paste would (value, then an input event)."""
    page.evaluate(
        f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
        f" el.value = {json.dumps(text)};"
        " el.dispatchEvent(new Event('input', {bubbles: true})); return true; })()"
    )


def test_every_page_loads_only_this_server_s_scripts_without_errors(server, clean):
    run_id = finished(server, "pages-csp")
    views = {
        "/": "document.querySelector('table.runs a')",
        "/#/workers": "document.querySelector('h1')?.textContent === 'Workers'",
        "/#/smoke-test": "document.querySelector('.card h2')",
        "/#/new": "document.querySelector('#run-preset option[value=\"cpu-tiny\"]')",
        f"/#/runs/{run_id}": "document.querySelector('polyline.series')",
    }
    origin = urlsplit(server.url).netloc
    for path, rendered in views.items():
        clean.goto(server.url + path)
        clean.wait_for(rendered)
        scripts = clean.evaluate(
            "[...document.scripts].map((s) => [s.type, s.src, s.textContent.trim().length])"
        )
        assert scripts == [["module", server.url + "/static/app.js", 0]], scripts
        loaded = clean.evaluate("performance.getEntriesByType('resource').map((e) => e.name)")
        assert all(urlsplit(u).netloc == origin for u in loaded), loaded
        modules = {urlsplit(u).path for u in loaded if u.endswith(".js")}
        assert {"/static/js/api.js", "/static/js/charts.js", "/static/js/router.js"} <= modules
    response = httpx.get(server.url + "/static/js/api.js", timeout=30)
    assert "javascript" in response.headers["content-type"]
    assert response.headers["cache-control"] == "no-cache"
    assert "script-src 'self'" in response.headers["content-security-policy"]


def test_the_editor_shows_a_validation_error_at_its_field_then_submits(server, clean):
    clean.goto(server.url + "/#/new")
    clean.wait_for("document.querySelector('#doc-train_config')")
    bad = json.loads(json.dumps(TRAIN))
    bad["train"]["micro_batch_size"] = -3
    train_text = yaml.safe_dump(bad, sort_keys=False)
    set_text(clean, "#run-name", "from-the-editor")
    set_text(clean, "#doc-train_config", train_text)
    set_text(clean, "#doc-model_config", yaml.safe_dump(MODEL, sort_keys=False))
    error = clean.wait_for(
        'document.querySelector(\'[data-errors-for="train_config"]'
        ' li[data-loc="train.micro_batch_size"]\')?.textContent'
    )
    line = train_text.splitlines().index("  micro_batch_size: -3") + 1
    assert f"(line {line})" in error, error
    assert clean.evaluate("document.querySelector('#doc-train_config').className") == "invalid"
    assert clean.evaluate("document.querySelector('[data-action=submit]').disabled") is True
    assert not clean.evaluate("document.querySelector('[data-errors-for=\"model_config\"] li')")

    set_text(clean, "#doc-train_config", yaml.safe_dump(TRAIN, sort_keys=False))
    clean.wait_for("document.querySelector('#validate-status').textContent.startsWith('valid')")
    assert clean.evaluate("document.querySelector('#editor-estimate dl')") is not None
    clean.evaluate("document.querySelector('[data-action=submit]').click()")
    new_id = clean.wait_for(
        "location.hash.startsWith('#/runs/') && decodeURIComponent(location.hash.slice(7))"
    )
    run = httpx.get(f"{server.url}/runs/{new_id}", timeout=30).json()
    assert run["name"] == "from-the-editor" and run["status"] == "queued"


def test_a_preset_fills_the_editor_with_its_documents(server, clean):
    """The editor writes the preset's documents as YAML of its own: they read back equal."""
    clean.goto(server.url + "/#/new")
    clean.wait_for("document.querySelector('#run-preset option[value=\"cpu-tiny\"]')")
    clean.evaluate(
        "(() => { const s = document.querySelector('#run-preset'); s.value = 'cpu-tiny';"
        " s.dispatchEvent(new Event('change')); return true; })()"
    )
    clean.evaluate("document.querySelector('[data-action=load-preset]').click()")
    clean.wait_for("document.querySelector('#doc-model_config').value.length > 0")
    preset = next(
        p for p in httpx.get(f"{server.url}/presets", timeout=30).json() if p["name"] == "cpu-tiny"
    )
    for key in ("train_config", "model_config"):
        text = clean.evaluate(f"document.querySelector('#doc-{key}').value")
        assert yaml.safe_load(text) == preset[key], key
    assert clean.evaluate("document.querySelector('#run-name').value") == "cpu-tiny"


def test_clone_prefills_the_resolved_config(server, clean):
    run_id = finished(server, "to-clone")
    clean.goto(f"{server.url}/#/runs/{run_id}")
    clean.wait_for("document.querySelector('[data-action=clone]')")
    clean.evaluate("document.querySelector('[data-action=clone]').click()")
    clean.wait_for("document.querySelector('#doc-train_config')?.value.length > 0")
    train = yaml.safe_load(clean.evaluate("document.querySelector('#doc-train_config').value"))
    model = yaml.safe_load(clean.evaluate("document.querySelector('#doc-model_config').value"))
    resolved = yaml.safe_load(httpx.get(f"{server.url}/runs/{run_id}/config", timeout=30).text)
    # every key of the resolved train config but out_dir (each run writes to its own folder)
    assert resolved["train_config"].pop("out_dir") == str(server.settings.run_dir(run_id) / "out")
    assert train == resolved["train_config"] and model == resolved["model_config"]
    assert clean.evaluate("document.querySelector('#run-name').value") == "to-clone-clone"
    # the resolved documents are themselves a valid submission
    clean.wait_for("document.querySelector('#validate-status').textContent.startsWith('valid')")


def test_delete_removes_a_finished_run_and_export_saves_its_metrics(server, clean):
    run_id = finished(server, "to-delete", steps=30)
    clean.goto(f"{server.url}/#/runs/{run_id}")
    clean.wait_for("document.querySelector('[data-action=delete]')")
    # CSV export: catch the Blob the page saves
    csv = clean.evaluate(
        "new Promise((resolve) => { URL.createObjectURL = (b) => { b.text().then(resolve);"
        " return 'data:,'; }; document.querySelector('[data-action=export-csv]').click(); })"
    )
    lines = csv.strip().splitlines()
    assert lines[0].startswith("step,") and len(lines) == 31
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(1, 31))
    clean.evaluate("document.querySelector('[data-action=delete]').click()")  # confirm: accepted
    clean.wait_for("location.hash === '#/'")
    assert httpx.get(f"{server.url}/runs/{run_id}", timeout=30).status_code == 404
    # a running run has no delete button
    live = make_run(server, "still-running")
    start_run(server, live)
    clean.goto(f"{server.url}/#/runs/{live}")
    clean.wait_for("document.querySelector('.badge.running.big')")
    assert clean.evaluate("document.querySelector('[data-action=delete]')") is None


def test_smoothing_changes_the_drawn_loss_path(server, clean):
    run_id = finished(server, "to-smooth")
    clean.goto(f"{server.url}/#/runs/{run_id}")
    loss_paths = (
        "[...document.querySelectorAll('[aria-label=\"loss vs step\"] polyline')]"
        ".map((p) => [p.getAttribute('class'), p.getAttribute('points')])"
    )
    clean.wait_for(f"{loss_paths}.length === 2")
    clean.evaluate("localStorage.removeItem('moejobs.smoothing')")
    (_, raw), (_, val) = clean.evaluate(loss_paths)
    set_text(clean, "#smoothing", "0.9")
    paths = clean.wait_for(f"(() => {{ const p = {loss_paths}; return p.length === 3 && p; }})()")
    classes = [c for c, _ in paths]
    assert classes.count("series raw") == 1  # the raw train curve, faint behind
    assert paths[-1][1] == val  # validation is drawn unsmoothed
    faint_train = paths[classes.index("series raw")][1]
    smoothed = paths[classes.index("series")][1]
    assert faint_train == raw and smoothed != raw

    # smoothing flattens the noise: the smoothed path moves less from point to point
    def roughness(points: str) -> float:
        ys = [float(p.split(",")[1]) for p in points.split()]
        return sum(abs(a - b) for a, b in zip(ys, ys[1:], strict=False))

    assert roughness(smoothed) < roughness(raw) / 2
    assert clean.evaluate("document.querySelector('.smooth-value').textContent") == "0.90"
    set_text(clean, "#smoothing", "0")  # back to the raw curve alone
    clean.wait_for(f"{loss_paths}.length === 2")
    clean.evaluate("localStorage.removeItem('moejobs.smoothing')")


def test_the_smoke_test_page_lists_the_server_s_smoke_tests(server, clean):
    first = make_run(server, "smoke-test-a", preset="smoke-test")
    finish_run(server, first, status="failed", reason="crashed")
    second = make_run(server, "smoke-test-b", preset="smoke-test")
    page = httpx.get(f"{server.url}/smoke-tests?limit=5", timeout=30).json()
    assert [item["id"] for item in page["items"]] == [str(second), str(first)]
    assert page["items"][1]["status"] == "failed" and page["items"][0]["name"] == "smoke-test-b"
    assert httpx.get(f"{server.url}/smoke-tests?limit=0", timeout=30).status_code == 422
    clean.goto(server.url + "/#/smoke-test")
    ids = clean.wait_for(
        "(() => { const r = [...document.querySelectorAll('table.smoke-list tr[data-smoke-id]')]"
        ".map((tr) => tr.dataset.smokeId); return r.length === 2 && r; })()"
    )
    assert ids == [str(second), str(first)]
    presets = httpx.get(f"{server.url}/presets", timeout=30).json()
    tiny = next(p for p in presets if p["name"] == "cpu-tiny")
    assert tiny["model_config"]["name"] == "MoE-tiny"


def test_the_driver_sees_errors_and_policy_violations(server, page: Browser):
    """The control for ``clean``: an uncaught error, a console.error and an inline script the
    policy blocks all reach ``problems`` (and the policy's report reaches the server)."""
    page.goto(server.url + "/#/workers")
    page.wait_for("document.querySelector('h1')")
    page.problems.clear()
    CSP_REPORTS.clear()
    page.evaluate(
        "setTimeout(() => { throw new Error('boom'); }); console.error('said');"
        " const s = document.createElement('script'); s.textContent = 'window.ran = 1';"
        " document.body.append(s); true"
    )
    page.wait_for("true")
    deadline = time.monotonic() + 10
    while len(page.problems) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    text = " | ".join(page.problems)
    assert "boom" in text and "said" in text and "Content Security Policy" in text, text
    assert page.evaluate("window.ran") is None
    page.problems.clear()
    CSP_REPORTS.clear()


def test_the_empty_runs_list_points_at_the_new_run_page(tmp_path, page: Browser):
    with live_server(tmp_path) as empty:
        page.goto(empty.url + "/")
        text = page.wait_for("document.querySelector('td.empty a[href=\"#/new\"]')?.textContent")
        assert text == "Start a new run"
        assert "curl" not in page.evaluate("document.querySelector('td.empty').textContent")
