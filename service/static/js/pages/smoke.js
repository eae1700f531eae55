/* The smoke test: the page (#/smoke-test) and the panel the runs list shows. */
import { getSmokeTest, listSmokeTests, startSmokeTest } from '../api.js';
import { append, badge, fill, fmtDuration, h, isNum, POLL_IDLE_MS, shortId, timeEl, toast } from '../util.js';

const SMOKE_KEY = 'moejobs.lastSmokeTest';

// A smoke test's answer is SmokeTestPublic (service/api/models.py): {id (its run's id), status
// (pending, running, passed, failed), stages: [{name, seconds, status}], failed_stage, message}.
function smokeState(r) {
  if (!r) return 'none';
  return r.status === 'passed' || r.status === 'failed' ? r.status : 'running';
}

export function smokePanel(card, alive, compact) {
  let result = null;
  let testId = null;
  try { testId = localStorage.getItem(SMOKE_KEY); } catch (e) { /* ignore */ }
  let polling = false;
  const button = h('button', { class: 'btn btn-primary btn-small', type: 'button', onclick: start }, 'Run smoke test');
  const body = h('div', {});
  append(card, [h('div', { class: 'card-head' }, h('h2', {}, 'Smoke test'), h('span', { class: 'spacer' }), button),
    compact ? null : h('p', { class: 'muted' }, 'Trains the shipped MoE configs with the smoke-test overrides on the server\'s sample data, through the real queue and a real worker, and times each stage.'),
    body]);
  renderResult();

  async function start() {
    button.disabled = true;
    try {
      const r = await startSmokeTest();
      testId = r.id; result = r;
    } catch (e) {
      // 409 smoke_test_running: the error body's run_id is the running one
      const running = e.status === 409 && e.body && e.body.run_id ? e.body.run_id : null;
      if (!running) { toast(`Smoke test not started: ${e.message}`, 'bad'); button.disabled = false; return; }
      toast('A smoke test is already running: showing it.');
      testId = running; result = null;
    }
    try { localStorage.setItem(SMOKE_KEY, testId || ''); } catch (e) { /* ignore */ }
    renderResult();
    follow();
  }

  async function follow() {
    if (polling || !testId) return;
    polling = true;
    try {
      while (alive() && testId) {
        try {
          result = await getSmokeTest(testId, 20);
        } catch (e) {
          if (e.status === 404) { testId = null; result = null; try { localStorage.removeItem(SMOKE_KEY); } catch (x) { /* ignore */ } }
          else await new Promise((r) => setTimeout(r, 3000));
        }
        if (!alive()) return;
        renderResult();
        if (smokeState(result) !== 'running') break;
      }
    } finally { polling = false; }
  }

  function renderResult() {
    const state = testId ? smokeState(result) : 'none';
    button.disabled = state === 'running';
    if (!testId) { fill(body, h('p', { class: 'muted small' }, 'No smoke test on this server yet.')); return; }
    const stages = result ? result.stages : [];
    const failed = result && result.failed_stage;
    const message = result && result.message;
    // A smoke test is a run: its id is the run's id.
    fill(body,
      h('p', {}, badge(state), ' ',
        h('span', { class: 'mono muted small' }, shortId(testId)),
        [' · ', h('a', { href: `#/runs/${encodeURIComponent(testId)}` }, 'run')]),
      stages.length ? h('table', { class: 'stages' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Stage'), h('th', { class: 'num' }, 'Time'), h('th', {}, ''))),
        h('tbody', {}, stages.map((st) => h('tr', {},
          h('td', {}, st.name),
          h('td', { class: 'num' }, isNum(st.seconds) ? fmtDuration(st.seconds) : '–'),
          h('td', {}, badge(st.status === 'ok' ? 'succeeded' : st.status)))))) : null,
      state === 'failed' && (failed || message) ? h('div', { class: 'alert bad', style: { marginTop: '10px', marginBottom: 0 } },
        failed ? ['Failed at stage ', h('b', {}, failed)] : 'Failed', message ? `: ${message}` : '') : null);
  }

  return {
    /** Shows the server's newest smoke test (GET /smoke-tests) when this browser started none. */
    async refresh() {
      if (!testId) {
        const page = await listSmokeTests(1).catch(() => null);
        if (!alive()) return;
        const latest = page && page.items.length ? page.items[0] : null;
        if (latest && !testId) { testId = String(latest.id); result = latest; renderResult(); }
      }
      if (testId && !polling && (result === null || smokeState(result) === 'running')) follow();
    },
  };
}

/** The server's smoke tests, whoever started them (GET /smoke-tests: SmokeTestSummary). */
function smokeListCard(card, alive) {
  const body = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
  append(card, [h('h2', {}, 'Smoke tests on this server'), body]);
  return {
    async refresh() {
      let page;
      try { page = await listSmokeTests(20); } catch (e) {
        fill(body, h('p', { class: 'muted' }, `Could not load the smoke tests: ${e.message}`));
        return;
      }
      if (!alive()) return;
      if (!page.items.length) { fill(body, h('p', { class: 'muted' }, 'No smoke test has run on this server.')); return; }
      fill(body, h('div', { class: 'table-wrap' }, h('table', { class: 'smoke-list' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Result'), h('th', {}, 'Name'), h('th', {}, 'Started'),
          h('th', { class: 'num' }, 'Time'), h('th', {}, 'Failed at'))),
        h('tbody', {}, page.items.map((t) => h('tr', { 'data-smoke-id': t.id },
          h('td', {}, badge(smokeState(t))),
          h('td', { class: 'name', title: t.name }, h('a', { href: `#/runs/${encodeURIComponent(t.id)}` }, t.name)),
          h('td', {}, timeEl(t.created_at)),
          h('td', { class: 'num' }, isNum(t.total_seconds) ? fmtDuration(t.total_seconds) : '–'),
          h('td', { title: t.message || '' }, t.failed_stage || ''),
        ))))));
    },
  };
}

export function smokeView(root, alive) {
  const card = h('section', { class: 'card' });
  const listCard = h('section', { class: 'card', style: { marginTop: '16px' } });
  root.append(h('div', { class: 'page-head' }, h('h1', {}, 'Smoke test')), card, listCard);
  const panel = smokePanel(card, alive, false);
  const list = smokeListCard(listCard, alive);
  return { async refresh() { await Promise.all([panel.refresh(), list.refresh()]); return POLL_IDLE_MS; } };
}
