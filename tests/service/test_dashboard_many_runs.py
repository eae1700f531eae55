"""The dashboard's "many runs" pages in a headless Chromium (``tests.support.browser``): the runs
list's filters and selection, tag and note editing, the compare page's overlays and tables, the
sweep page's parallel coordinates and scatter plots, and the sweep editor's live validation,
against the real app with real rows (metrics written as a worker would; no training). Every
page runs under the Content-Security-Policy with no console error or policy violation."""

from __future__ import annotations

import copy
import json
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

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

LR = "train_config.optimizer.init_args.lr"
EXPERTS = "model_config.n_expert"
PALETTE_0_1 = ["#2f6fde", "#e4572e"]  # js/util.js PALETTE: the compare page's first two colours


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(tmp_path_factory.mktemp("dashboard-many"), wrap=CspReportCollector) as srv:
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


def finished(server, name: str, *, train: dict | None = None, seed: int = 0, steps: int = 100):
    run_id = make_run(server, name, train=train)
    attempt = start_run(server, run_id)
    record_metrics(server, run_id, metric_rows(1, steps, seed=seed), attempt=attempt)
    finish_run(server, run_id, attempt=attempt)
    return run_id


def set_text(page: Browser, selector: str, text: str) -> None:
    """Type ``text`` into a field as a user's paste would (value, then an input event)."""
    page.evaluate(
        f"(() => {{ const el = document.querySelector({json.dumps(selector)});"
        f" el.value = {json.dumps(text)};"
        " el.dispatchEvent(new Event('input', {bubbles: true})); return true; })()"
    )


def click(page: Browser, selector: str) -> None:
    page.evaluate(f"document.querySelector({json.dumps(selector)}).click()")


def api(server, method: str, path: str, **kwargs: Any) -> Any:
    r = httpx.request(method, server.url + path, timeout=30, **kwargs)
    assert r.status_code < 300, r.text
    return r.json() if r.content else None


def test_the_list_filters_by_tag_and_opens_the_compare_page(server, clean):
    faster = copy.deepcopy(TRAIN)
    faster["optimizer"]["init_args"]["lr"] = 0.003
    a = finished(server, "cmp-base", seed=1)
    b = finished(server, "cmp-faster", train=faster, seed=2)
    finished(server, "cmp-other", seed=3)
    for run_id in (a, b):
        api(server, "PATCH", f"/runs/{run_id}", json={"add_tags": ["cmp"]})

    clean.goto(server.url + "/#/")
    clean.wait_for(f"document.querySelector('tr[data-run-id=\"{a}\"] .tag[data-tag=cmp]')")
    set_text(clean, "#filter-tag", "cmp")
    shown = clean.wait_for(
        "(() => { const r = [...document.querySelectorAll('tr[data-run-id]')]"
        ".map((tr) => tr.dataset.runId); return r.length === 2 && r; })()"
    )
    assert set(shown) == {str(a), str(b)}
    assert clean.evaluate("document.querySelector('[data-action=compare]').disabled") is True
    for run_id in (a, b):
        click(clean, f'input[data-select="{run_id}"]')
    assert clean.evaluate("document.querySelector('[data-action=compare]').disabled") is False
    click(clean, "[data-action=compare]")
    clean.wait_for("location.hash.startsWith('#/compare?runs=')")
    ids = clean.evaluate("decodeURIComponent(location.hash.split('runs=')[1]).split(',')")
    assert sorted(ids) == sorted([str(a), str(b)])

    # one trace per run on each overlay, in the palette's first two colours
    for chart in ("loss overlay", "val_loss overlay", "learning_rate overlay"):
        strokes = clean.wait_for(
            f'(() => {{ const p = [...document.querySelectorAll(\'[aria-label="{chart}"]'
            " polyline.series')].map((e) => e.getAttribute('stroke'));"
            " return p.length === 2 && p; })()"
        )
        assert strokes == PALETTE_0_1, (chart, strokes)
    legend = clean.evaluate(
        "[...document.querySelectorAll('.compare-legend [data-run] a')].map((e) => e.textContent)"
    )
    names = {str(a): "cmp-base", str(b): "cmp-faster"}
    assert legend == [names[i] for i in ids]
    # the differing key, with each run's value; the metrics table
    lrs = clean.evaluate(
        f"[...document.querySelectorAll('tr[data-key=\"{LR}\"] td')].map((e) => e.textContent)"
    )
    values = {str(a): str(TRAIN["optimizer"]["init_args"]["lr"]), str(b): "0.003"}
    assert lrs == [LR] + [values[i] for i in ids]
    assert clean.evaluate("document.querySelectorAll('tr[data-row=\"best loss\"] td').length") == 2

    # smoothing applies to the loss overlay: the raw curves stay, faint, behind
    set_text(clean, "#smoothing", "0.9")
    clean.wait_for(
        "document.querySelectorAll('[aria-label=\"loss overlay\"] polyline.series.raw').length"
        " === 2"
    )
    clean.evaluate("localStorage.removeItem('moejobs.smoothing')")


def test_tags_and_the_note_round_trip_through_the_run_page(server, clean):
    run_id = finished(server, "to-tag", steps=20)
    clean.goto(f"{server.url}/#/runs/{run_id}")
    clean.wait_for("document.querySelector('#tag-input')")
    set_text(clean, "#tag-input", "exp1, lr=3e-4 best")
    click(clean, "[data-action=add-tags]")
    clean.wait_for("document.querySelectorAll('#run-tags [data-tag]').length === 3")
    assert api(server, "GET", f"/runs/{run_id}")["tags"] == ["exp1", "lr=3e-4", "best"]

    click(clean, '[data-remove-tag="lr=3e-4"]')
    clean.wait_for("document.querySelectorAll('#run-tags [data-tag]').length === 2")
    assert api(server, "GET", f"/runs/{run_id}")["tags"] == ["exp1", "best"]

    # a refused tag is shown at its field; nothing changes
    set_text(clean, "#tag-input", "bad!tag")
    click(clean, "[data-action=add-tags]")
    error = clean.wait_for(
        "document.querySelector('[data-errors-for=tags] li[data-loc=add_tags]')?.textContent"
    )
    assert "bad!tag" in error
    assert api(server, "GET", f"/runs/{run_id}")["tags"] == ["exp1", "best"]
    # the browser logs the refused request itself, and nothing else
    assert all("status of 422" in p for p in clean.problems), clean.problems
    clean.problems.clear()

    set_text(clean, "#note-input", "baseline, 4 experts")
    click(clean, "[data-action=save-note]")
    clean.wait_for("document.querySelector('[data-action=save-note]').disabled")
    assert api(server, "GET", f"/runs/{run_id}")["note"] == "baseline, 4 experts"
    set_text(clean, "#note-input", "")
    click(clean, "[data-action=save-note]")
    clean.wait_for("document.querySelector('[data-action=save-note]').disabled")
    assert api(server, "GET", f"/runs/{run_id}")["note"] is None

    # the list shows the tags, and a click on one filters by it
    clean.goto(server.url + "/#/")
    clean.wait_for(f"document.querySelector('tr[data-run-id=\"{run_id}\"] button[data-tag=exp1]')")
    click(clean, f'tr[data-run-id="{run_id}"] button[data-tag=exp1]')
    clean.wait_for(
        "(() => { const r = [...document.querySelectorAll('tr[data-run-id]')];"
        f" return r.length === 1 && r[0].dataset.runId === '{run_id}'; }})()"
    )
    assert clean.evaluate("document.querySelector('#filter-tag').value") == "exp1"


def sweep_doc(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "base": {"train_config": copy.deepcopy(TRAIN), "model_config": copy.deepcopy(MODEL)},
        "method": "grid",
        "metric": {"name": "loss", "goal": "minimize"},
        "parameters": {LR: {"values": [1e-4, 3e-3, 3e-2]}, EXPERTS: {"values": [4, 8]}},
        "max_concurrent": 6,
        "seed": 0,
    }


def test_the_sweep_page_draws_parallel_coordinates_and_scatter_plots(server, clean):
    sweep = api(server, "POST", "/sweeps", json=sweep_doc("pc-sweep"))
    trials = sweep["trials"]
    assert [t["status"] for t in trials] == ["queued"] * 6
    # five trials train (as a worker would record them); the sixth stays queued, with no value
    for t in trials[:5]:
        run_id = uuid.UUID(t["run_id"])
        attempt = start_run(server, run_id)
        rows = metric_rows(1, 40, seed=t["number"])
        for row in rows:
            row["loss"] += 0.3 * abs(t["number"] - 2)  # trial 2 is the best
        record_metrics(server, run_id, rows, attempt=attempt)
        finish_run(server, run_id, attempt=attempt)
    best = api(server, "GET", f"/sweeps/{sweep['id']}")["best_trial"]
    assert best["number"] == 2

    clean.goto(f"{server.url}/#/sweeps/{sweep['id']}")
    lines = clean.wait_for(
        "(() => { const l = [...document.querySelectorAll('#sweep-parallel polyline.pc-line')];"
        " return l.length === 5 && l.map((e) => [e.getAttribute('class'),"
        " e.getAttribute('points').split(' ').length]); })()"
    )
    assert [c for c, _ in lines].count("pc-line best") == 1
    assert all(n == 3 for _, n in lines)  # two parameters and the metric
    scales = clean.evaluate(
        "Object.fromEntries([...document.querySelectorAll('#sweep-parallel .pc-axis')]"
        ".map((g) => [g.dataset.key, g.dataset.scale]))"
    )
    assert scales == {LR: "log", EXPERTS: "linear", "metric:loss": "linear"}
    dots = clean.evaluate(
        "[...document.querySelectorAll('#sweep-scatter svg')].map((s) => s.querySelectorAll("
        "'circle.pt').length)"
    )
    assert dots == [5, 5]
    assert clean.evaluate("document.querySelector('table.trials tr.best').dataset.trial") == "2"
    rows = clean.evaluate("document.querySelectorAll('table.trials tbody tr').length")
    assert rows == 6
    # a running sweep can be cancelled, not deleted; "Compare trials" opens the trials' runs
    assert clean.evaluate("document.querySelector('[data-action=delete-sweep]')") is None
    click(clean, "[data-action=compare-trials]")
    clean.wait_for("location.hash.startsWith('#/compare?runs=')")
    ids = clean.evaluate("decodeURIComponent(location.hash.split('runs=')[1]).split(',')")
    assert ids[0] == best["run_id"] and len(ids) == 6
    clean.wait_for(
        "document.querySelectorAll('[aria-label=\"loss overlay\"] polyline.series').length === 5"
    )

    clean.goto(f"{server.url}/#/sweeps/{sweep['id']}")
    clean.wait_for("document.querySelector('[data-action=cancel-sweep]')")
    click(clean, "[data-action=cancel-sweep]")  # confirm: accepted
    clean.wait_for("document.querySelector('[data-action=delete-sweep]')")
    assert api(server, "GET", f"/sweeps/{sweep['id']}")["status"] == "cancelled"
    click(clean, "[data-action=delete-sweep]")
    clean.wait_for("location.hash === '#/sweeps'")
    assert httpx.get(f"{server.url}/sweeps/{sweep['id']}", timeout=30).status_code == 404


def test_the_sweep_editor_shows_a_validation_error_at_its_field_then_creates(server, clean):
    clean.goto(server.url + "/#/sweeps")
    clean.wait_for("document.querySelector('a[data-nav=sweeps].active')")
    click(clean, "[data-action=new-sweep]")
    clean.wait_for("document.querySelector('#sweep-doc')")
    doc = sweep_doc("from-the-editor")
    doc["parameters"] = {"model_config.n_expertz": {"values": [4, 8]}}
    text = yaml.safe_dump(doc, sort_keys=False)
    set_text(clean, "#sweep-doc", text)
    error = clean.wait_for(
        "document.querySelector('[data-errors-for=sweep]"
        ' li[data-loc="parameters.model_config.n_expertz"]\')?.textContent'
    )
    line = text.splitlines().index("  model_config.n_expertz:") + 1
    assert f"(line {line})" in error and "unknown path" in error, error
    assert clean.evaluate("document.querySelector('#sweep-doc').className") == "invalid"
    assert clean.evaluate("document.querySelector('[data-action=submit]').disabled") is True

    set_text(clean, "#sweep-doc", json.dumps(sweep_doc("from-the-editor")))  # JSON works too
    clean.wait_for("document.querySelector('#validate-status').textContent === 'valid'")
    assert clean.evaluate("document.querySelectorAll('#sweep-points tbody tr').length") == 6
    click(clean, "[data-action=submit]")
    sweep_id = clean.wait_for(
        "/^#\\/sweeps\\/[0-9a-f-]{36}$/.test(location.hash) && location.hash.slice(9)"
    )
    clean.wait_for("document.querySelector('table.trials tbody tr')")
    assert api(server, "GET", f"/sweeps/{sweep_id}")["name"] == "from-the-editor"
    api(server, "POST", f"/sweeps/{sweep_id}/cancel")


def test_the_new_pages_load_only_this_server_s_scripts(server, clean):
    a = finished(server, "csp-a", steps=10)
    b = finished(server, "csp-b", steps=10)
    views = {
        "/#/sweeps": "document.querySelector('[data-action=new-sweep]')",
        "/#/sweeps/new": "document.querySelector('#sweep-preset option[value=\"cpu-tiny\"]')",
        f"/#/sweeps/new?from={a}": "document.querySelector('#validate-status').textContent",
        f"/#/compare?runs={a},{b}": "document.querySelector('tr[data-row=status]')",
    }
    origin = urlsplit(server.url).netloc
    for path, rendered in views.items():
        clean.goto(server.url + path)
        clean.wait_for(rendered)
        scripts = clean.evaluate("[...document.scripts].map((s) => [s.type, s.src])")
        assert scripts == [["module", server.url + "/static/app.js"]], scripts
        loaded = clean.evaluate("performance.getEntriesByType('resource').map((e) => e.name)")
        assert all(urlsplit(u).netloc == origin for u in loaded), loaded
    # a sweep from a run: the run's resolved configs as the base, a valid document
    clean.goto(f"{server.url}/#/sweeps/new?from={a}")
    clean.wait_for("document.querySelector('#validate-status').textContent === 'valid'")
    doc = yaml.safe_load(clean.evaluate("document.querySelector('#sweep-doc').value"))
    assert "out_dir" not in doc["base"]["train_config"]


def test_sweep_axes_are_log_categorical_or_linear(server, clean):
    """The rule of the sweep plots' axes (js/charts.js), run in the page: log for a log_uniform
    parameter or positive values spanning more than two decades, categorical for any value that
    is not a number, linear otherwise."""
    clean.goto(server.url + "/#/sweeps")
    clean.wait_for("document.querySelector('[data-action=new-sweep]')")
    got = clean.evaluate(
        "import('./static/js/charts.js').then((c) => ["
        " c.wantsLog([0.001, 0.002], 'log_uniform'), c.wantsLog([1e-4, 3e-2]),"
        " c.wantsLog([1e-4, 1e-2]), c.wantsLog([4, 8]), c.wantsLog(['a', 'b']),"
        " c.axisScale([1e-4, 3e-2], true).kind, c.axisScale([4, 8], false).kind,"
        " c.axisScale(['adamw', 'sgd', 'adamw'], false).ticks.map((t) => [t.label, t.at]),"
        " c.axisScale([true, false], true).kind])"
    )
    assert got == [
        True,
        True,
        False,
        False,
        False,
        "log",
        "linear",
        [["adamw", 0], ["sgd", 1]],
        "category",
    ]
