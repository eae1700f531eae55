/* moejobs dashboard: vanilla JavaScript, no dependencies, no build step.
 *
 * Views (hash routes): #/ runs list (+ workers and smoke test panels), #/runs/<id> one run,
 * #/workers, #/smoke-test. Everything is read from the JSON API next to this page and refreshed
 * by polling; charts are inline SVG drawn here.
 *
 * API token: when the API answers 401 the token dialog opens (once for all pending requests);
 * the token is kept in localStorage and sent as "Authorization: Bearer <token>".
 */
'use strict';

(function () {
  // The API lives next to this page: the page is GET /, so "/runs" etc. A reverse proxy that
  // serves everything under a prefix keeps working (the page's folder is the prefix).
  const API_BASE = location.pathname.replace(/[^/]*$/, '').replace(/\/$/, '');
  const TOKEN_KEY = 'moejobs.apiToken';
  const SMOKE_KEY = 'moejobs.lastSmokeTest';
  // A run's statuses and the terminal ones: service.models.RunStatus and TERMINAL_STATUSES
  // (tests/service/test_dashboard.py checks that these two lines say the same).
  const STATUSES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];
  const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
  const POLL_LIVE_MS = 3000;
  const POLL_IDLE_MS = 15000;
  const LOG_TAIL = 300;
  const PALETTE = ['#2f6fde', '#e4572e', '#17a398', '#f2a541', '#8f5bd6', '#d1495b', '#3aa655',
    '#7a8a9e', '#00a6ed', '#c97b2d', '#b5446e', '#5c7aea', '#6a994e', '#9a6fb0', '#e07a5f', '#3d5a80'];

  // ---------------------------------------------------------------------------------------------
  // DOM and formatting helpers

  /** h('div', {class: 'x', onclick: fn}, child, 'text', [more]) -> Element. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
      else if (key === 'class') el.className = value;
      else if (key === 'text') el.textContent = value;
      else if (key === 'style' && typeof value === 'object') Object.assign(el.style, value);
      else el.setAttribute(key, value === true ? '' : value);
    }
    append(el, children);
    return el;
  }
  /** Replace el's children (null/false/undefined children are skipped, arrays flattened). */
  function fill(el, ...children) {
    el.replaceChildren();
    return append(el, children);
  }
  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }
  // The SVG namespace, taken from an element the HTML parser made (no URL literal needed).
  const SVG_NS = (() => { const t = document.createElement('template'); t.innerHTML = '<svg></svg>'; return t.content.firstChild.namespaceURI; })();
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null) continue;
      if (key === 'text') el.textContent = value;
      else el.setAttribute(key, value);
    }
    for (const child of children.flat(Infinity)) if (child) el.append(child);
    return el;
  }

  function isNum(v) { return typeof v === 'number' && Number.isFinite(v); }
  function fmtNum(v, digits = 4) {
    if (!isNum(v)) return '–';
    if (v === 0) return '0';
    const a = Math.abs(v);
    if (a >= 1e5 || a < 1e-3) return v.toExponential(2).replace('e+', 'e');
    return Number(v.toPrecision(digits)).toString();
  }
  function fmtInt(v) { return isNum(v) ? Math.round(v).toLocaleString('en-US') : '–'; }
  function fmtSI(v, unit = '') {
    if (!isNum(v)) return '–';
    const units = ['', 'k', 'M', 'G', 'T', 'P', 'E'];
    let i = 0; let x = Math.abs(v);
    while (x >= 1000 && i < units.length - 1) { x /= 1000; i++; }
    const text = x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
    return (v < 0 ? '-' : '') + text + ' ' + units[i] + unit;
  }
  function fmtBytes(v) {
    if (!isNum(v)) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0; let x = v;
    while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
    return (i === 0 ? x.toFixed(0) : x.toFixed(x >= 100 ? 0 : 1)) + ' ' + units[i];
  }
  function fmtDuration(sec) {
    if (!isNum(sec)) return '–';
    sec = Math.max(0, sec);
    if (sec < 60) return sec.toFixed(sec < 10 ? 1 : 0) + ' s';
    const m = Math.floor(sec / 60); const ss = Math.round(sec % 60);
    if (m < 60) return `${m} min ${ss} s`;
    const hh = Math.floor(m / 60); const mm = m % 60;
    if (hh < 48) return `${hh} h ${mm} min`;
    return `${Math.floor(hh / 24)} d ${hh % 24} h`;
  }
  function parseTime(iso) {
    if (!iso) return null;
    // Naive timestamps from the API are UTC.
    const text = /[zZ]|[+-]\d\d:?\d\d$/.test(iso) ? iso : iso + 'Z';
    const t = new Date(text);
    return Number.isNaN(t.getTime()) ? null : t;
  }
  function pad(n) { return String(n).padStart(2, '0'); }
  function fmtTime(iso) {
    const t = parseTime(iso);
    if (!t) return '–';
    return `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())} ` +
      `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}`;
  }
  function fmtAgo(iso) {
    const t = parseTime(iso);
    if (!t) return '–';
    const sec = (Date.now() - t.getTime()) / 1000;
    if (sec < 5) return 'just now';
    if (sec < 60) return `${Math.round(sec)} s ago`;
    if (sec < 3600) return `${Math.round(sec / 60)} min ago`;
    if (sec < 86400) return `${Math.round(sec / 3600)} h ago`;
    return fmtTime(iso).slice(0, 10);
  }
  function timeEl(iso, relative = true) {
    return h('time', { datetime: iso || '', title: fmtTime(iso) }, relative ? fmtAgo(iso) : fmtTime(iso));
  }
  function badge(status, extra = '') {
    return h('span', { class: `badge ${status || ''} ${extra}`.trim() }, status || 'unknown');
  }
  function shortId(id) { return String(id || '').slice(0, 8); }
  /** A config warning ({loc, msg}: IssueOut in service/api/models.py) as "train.max_tokens: msg". */
  function issueText(w) {
    const loc = w.loc.map((p) => (typeof p === 'number' ? `[${p}]` : p)).join('.').replace(/\.\[/g, '[');
    return loc ? `${loc}: ${w.msg}` : w.msg;
  }
  function stepsTotal(run) {
    const plan = run && run.estimate && run.estimate.plan;
    return plan && isNum(plan.optimizer_steps) ? plan.optimizer_steps : null;
  }

  // ---------------------------------------------------------------------------------------------
  // API access, token handling, connection indicator

  class ApiError extends Error {
    constructor(status, message, body) { super(message); this.status = status; this.body = body; }
  }
  let tokenPrompt = null;       // pending dialog promise shared by concurrent 401s
  let tokenDeclined = false;    // the user closed the dialog: do not reopen it on every poll

  function getToken() { try { return localStorage.getItem(TOKEN_KEY) || ''; } catch (e) { return ''; } }
  function setToken(value) {
    try { if (value) localStorage.setItem(TOKEN_KEY, value); else localStorage.removeItem(TOKEN_KEY); } catch (e) { /* private mode */ }
  }
  function authHeaders() { const t = getToken(); return t ? { Authorization: 'Bearer ' + t } : {}; }

  /** The message of an error answer: the API's error body ({code, message, errors?}: ErrorBody in
   *  service/api/openapi.py), or the start of a text answer from something in front of it. */
  function errorDetail(body, fallback) {
    if (!body) return fallback;
    if (typeof body === 'string') return body.slice(0, 300) || fallback;
    return typeof body.message === 'string' && body.message ? body.message : fallback;
  }

  /** fetch API_BASE+path; JSON (or text) on 2xx, ApiError otherwise. A 401 asks for the token. */
  async function api(path, opts = {}) {
    const headers = Object.assign({ Accept: 'application/json' }, authHeaders(), opts.headers || {});
    let res;
    try {
      res = await fetch(API_BASE + path, Object.assign({}, opts, { headers }));
    } catch (e) {
      setConn('bad', 'server unreachable');
      throw new ApiError(0, 'server unreachable');
    }
    // 401: no token sent; 403 with code invalid_token: the saved one is wrong.
    const rejected = res.status === 403 && (await res.clone().json().catch(() => ({}))).code === 'invalid_token';
    if (res.status === 401 || rejected) {
      setConn('warn', 'API token needed');
      if (!opts.retried && await askToken(getToken() ? 'The saved token was rejected.' : '')) {
        return api(path, Object.assign({}, opts, { retried: true }));
      }
      throw new ApiError(401, 'API token needed');
    }
    setConn('ok', 'connected');
    const type = res.headers.get('content-type') || '';
    let body = null;
    if (res.status !== 204) body = type.includes('json') ? await res.json().catch(() => null) : await res.text();
    if (!res.ok) throw new ApiError(res.status, errorDetail(body, `HTTP ${res.status}`), body);
    return body;
  }

  function askToken(reason, force = false) {
    if (tokenDeclined && !force) { showBanner(true); return Promise.resolve(false); }
    if (tokenPrompt) return tokenPrompt;
    const dialog = document.getElementById('token-dialog');
    const input = document.getElementById('token-input');
    document.getElementById('token-reason').textContent =
      (reason ? reason + ' ' : '') + 'This server needs an API token (the MOEJOBS_API_TOKEN it was started with).';
    input.value = getToken();
    tokenPrompt = new Promise((resolve) => {
      dialog.addEventListener('close', function onClose() {
        dialog.removeEventListener('close', onClose);
        tokenPrompt = null;
        const action = dialog.returnValue;
        if (action === 'save' && input.value.trim()) {
          setToken(input.value.trim()); tokenDeclined = false; showBanner(false); resolve(true);
        } else {
          if (action === 'clear') setToken('');
          tokenDeclined = true; showBanner(true); resolve(false);
        }
      });
      dialog.showModal();
      input.focus();
    });
    return tokenPrompt;
  }

  function showBanner(on) {
    const el = document.getElementById('banner');
    el.hidden = !on;
    if (on) {
      fill(el, 'This server needs an API token. ',
        h('button', { class: 'btn btn-small', type: 'button', onclick: () => askToken('', true).then((ok) => ok && refreshNow()) }, 'Enter token'));
    }
  }

  function setConn(kind, text) {
    const el = document.getElementById('conn');
    el.className = 'conn ' + kind;
    el.textContent = text;
  }

  let toastTimer = null;
  function toast(text, kind = '') {
    const el = document.getElementById('toast');
    el.className = 'toast ' + kind;
    el.textContent = text;
    el.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { el.hidden = true; }, 6000);
  }

  // ---------------------------------------------------------------------------------------------
  // Routing and polling: one view at a time; a view's poll loop stops when the route changes.

  let generation = 0;
  let currentRefresh = null;
  let pollTimer = null;

  function startView(render) {
    generation += 1;
    const gen = generation;
    clearTimeout(pollTimer);
    const view = document.getElementById('view');
    fill(view);
    const alive = () => gen === generation;
    const controller = render(view, alive);
    currentRefresh = async () => {
      clearTimeout(pollTimer);
      if (!alive()) return;
      let delay = POLL_IDLE_MS;
      try {
        if (!document.hidden) delay = (await controller.refresh()) || POLL_IDLE_MS;
      } catch (e) {
        if (!(e instanceof ApiError)) console.error(e);
      }
      if (alive()) pollTimer = setTimeout(currentRefresh, delay);
    };
    currentRefresh();
  }
  function refreshNow() { if (currentRefresh) currentRefresh(); }
  document.addEventListener('visibilitychange', () => { if (!document.hidden) refreshNow(); });

  function route() {
    document.title = 'moejobs';
    const hash = location.hash || '#/';
    let m;
    let nav = 'runs';
    if ((m = hash.match(/^#\/runs\/([^/?#]+)/))) startView((el, alive) => runView(el, alive, decodeURIComponent(m[1])));
    else if (hash.startsWith('#/workers')) { nav = 'workers'; startView(workersView); }
    else if (hash.startsWith('#/smoke-test')) { nav = 'smoke'; startView(smokeView); }
    else startView(runsView);
    for (const a of document.querySelectorAll('[data-nav]')) a.classList.toggle('active', a.dataset.nav === nav);
  }

  // ---------------------------------------------------------------------------------------------
  // Latest metric row per run (runs list): the API sends it with each run (latest_metrics).

  function latestMetric(run) {
    const row = run && run.latest_metrics;
    return row && isNum(row.step) ? row : null;
  }

  function progressEl(done, total, status) {
    const pct = total ? Math.min(100, (100 * (done || 0)) / total) : 0;
    const cls = status === 'succeeded' ? 'done' : status === 'failed' ? 'bad' : '';
    return h('div', { class: 'progress' },
      h('div', { class: 'bar ' + cls }, h('span', { style: { width: pct.toFixed(1) + '%' } })),
      h('span', { class: 'txt' }, `${isNum(done) ? fmtInt(done) : 0} / ${total ? fmtInt(total) : '?'}`));
  }

  // ---------------------------------------------------------------------------------------------
  // Runs list

  function runsView(root, alive) {
    const state = { status: '', items: [], cursor: null, extra: [], loadedMore: false };
    const tbody = h('tbody');
    const chips = h('div', { class: 'chips' });
    const more = h('button', { class: 'btn btn-small', type: 'button', hidden: true, onclick: loadMore }, 'Load more');
    const updated = h('span', { class: 'muted small' });
    const errorBox = h('div', { class: 'alert bad', hidden: true });
    for (const st of ['', ...STATUSES]) {
      chips.append(h('button', {
        class: 'chip' + (st === '' ? ' active' : ''), type: 'button', 'data-status': st,
        onclick: () => {
          state.status = st; state.extra = []; state.loadedMore = false;
          for (const c of chips.children) c.classList.toggle('active', c.dataset.status === st);
          fill(tbody, h('tr', {}, h('td', { colspan: 7, class: 'empty' }, 'Loading…')));
          refreshNow();
        },
      }, st || 'all'));
    }
    const workersCard = h('section', { class: 'card' });
    const smokeCard = h('section', { class: 'card' });
    root.append(
      h('div', { class: 'page-head' }, h('h1', {}, 'Runs'), chips, h('span', { class: 'spacer' }), updated),
      errorBox,
      h('div', { class: 'grid-main' },
        h('section', { class: 'card' },
          h('div', { class: 'table-wrap' },
            h('table', { class: 'runs' },
              h('thead', {}, h('tr', {},
                h('th', {}, 'Status'), h('th', {}, 'Name'), h('th', {}, 'Created'), h('th', {}, 'Steps'),
                h('th', { class: 'num' }, 'Loss'), h('th', { class: 'num' }, 'Tokens/s'), h('th', {}, 'ID'))),
              tbody)),
          h('div', { style: { textAlign: 'center', marginTop: '10px' } }, more)),
        h('div', { class: 'stack' }, workersCard, smokeCard)));
    tbody.append(h('tr', {}, h('td', { colspan: 7, class: 'empty' }, 'Loading…')));
    const workers = workersPanel(workersCard, alive, true);
    const smoke = smokePanel(smokeCard, alive, true);

    async function loadMore() {
      if (!state.cursor) return;
      more.disabled = true;
      try {
        const page = await api(`/runs?${query({ status: state.status, limit: 50, cursor: state.cursor })}`);
        state.extra.push(...page.items);
        state.cursor = page.next_cursor || null;
        state.loadedMore = true;
        await render();
      } catch (e) { toast(e.message, 'bad'); } finally { more.disabled = false; }
    }

    async function render() {
      const seen = new Set();
      const runs = [...state.items, ...state.extra].filter((r) => !seen.has(r.id) && seen.add(r.id));
      const latest = runs.map(latestMetric);
      if (!alive()) return;
      more.hidden = !state.cursor;
      if (!runs.length) {
        fill(tbody, h('tr', {}, h('td', { colspan: 7, class: 'empty' },
          state.status ? `No ${state.status} runs.` : 'No runs yet. Submit one with `moejobs submit TRAIN.yaml MODEL.yaml` or POST /runs.')));
        return;
      }
      fill(tbody, ...runs.map((run, i) => {
        const row = latest[i];
        const href = `#/runs/${encodeURIComponent(run.id)}`;
        return h('tr', { class: 'clickable', onclick: (ev) => { if (!ev.target.closest('a')) location.hash = href; } },
          h('td', {}, badge(run.status)),
          h('td', { class: 'name', title: run.name }, h('a', { href }, run.name || shortId(run.id))),
          h('td', {}, timeEl(run.created_at)),
          h('td', {}, progressEl(row ? row.step : 0, stepsTotal(run), run.status)),
          h('td', { class: 'num' }, row ? fmtNum(row.loss) : '–'),
          h('td', { class: 'num' }, row && isNum(row.tokens_per_sec) ? fmtInt(row.tokens_per_sec) : '–'),
          h('td', { class: 'mono muted', title: run.id }, shortId(run.id)));
      }));
    }

    return {
      async refresh() {
        try {
          const page = await api(`/runs?${query({ status: state.status, limit: 50 })}`);
          if (!alive()) return POLL_LIVE_MS;
          state.items = page.items;
          if (!state.loadedMore) state.cursor = page.next_cursor || null;
          errorBox.hidden = true;
          await render();
          updated.textContent = 'updated ' + new Date().toLocaleTimeString();
        } catch (e) {
          errorBox.hidden = false;
          errorBox.textContent = `Could not load runs: ${e.message}`;
        }
        workers.refresh();
        smoke.refresh(state.items);
        return POLL_LIVE_MS;
      },
    };
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') q.set(k, v);
    return q.toString();
  }

  // ---------------------------------------------------------------------------------------------
  // Workers

  function workersPanel(card, alive, compact) {
    const body = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
    append(card, [h('div', { class: 'card-head' }, h('h2', {}, 'Workers'),
      compact ? h('a', { href: '#/workers', class: 'small' }, 'details') : null), body]);
    return {
      async refresh() {
        let workers;
        try { workers = await api('/workers'); } catch (e) {
          fill(body, h('p', { class: 'muted' }, `Could not load workers: ${e.message}`));
          return;
        }
        if (!alive()) return;
        if (!workers.length) {
          fill(body, h('p', { class: 'muted' }, 'No worker has registered. Start one with `moejobs worker` (or `moejobs up`).'));
          return;
        }
        const rows = workers.map((w) => {
          // gpus: [{index, name, memory_bytes}] as the worker registered them (worker/registry.py)
          const gpuText = w.gpus.length
            ? w.gpus.map((g) => `${g.name || 'GPU'}${isNum(g.memory_bytes) ? ' ' + fmtBytes(g.memory_bytes) : ''}`).join(', ')
            : (w.gpu_count ? `${w.gpu_count} GPU` : 'CPU only');
          const live = w.live;
          const current = w.current_run_id
            ? h('a', { href: `#/runs/${encodeURIComponent(w.current_run_id)}`, class: 'mono' }, shortId(w.current_run_id))
            : h('span', { class: 'muted' }, 'idle');
          if (compact) {
            return h('tr', {},
              h('td', {}, badge(live ? 'live' : 'stale')),
              h('td', { title: `${w.id} on ${w.host}` }, h('span', { class: 'mono' }, w.id),
                h('div', { class: 'muted small' }, `${w.host || '?'} · ${gpuText}`)),
              h('td', {}, current));
          }
          return h('tr', {},
            h('td', {}, badge(live ? 'live' : 'stale')),
            h('td', { class: 'mono' }, w.id),
            h('td', {}, w.host || '–', isNum(w.pid) ? h('span', { class: 'muted' }, ` pid ${w.pid}`) : null),
            h('td', {}, gpuText),
            h('td', {}, timeEl(w.heartbeat_at)),
            h('td', {}, timeEl(w.started_at)),
            h('td', {}, current));
        });
        const head = compact
          ? h('tr', {}, h('th', {}, ''), h('th', {}, 'Worker'), h('th', {}, 'Run'))
          : h('tr', {}, ...['', 'Worker', 'Host', 'GPUs', 'Heartbeat', 'Started', 'Current run'].map((t) => h('th', {}, t)));
        fill(body, h('div', { class: 'table-wrap' }, h('table', {}, h('thead', {}, head), h('tbody', {}, rows))));
      },
    };
  }

  function workersView(root, alive) {
    const card = h('section', { class: 'card' });
    root.append(h('div', { class: 'page-head' }, h('h1', {}, 'Workers')), card);
    const panel = workersPanel(card, alive, false);
    return { async refresh() { await panel.refresh(); return POLL_LIVE_MS; } };
  }

  // ---------------------------------------------------------------------------------------------
  // Smoke test

  // A smoke test's answer is SmokeTestPublic (service/api/models.py): {id (its run's id), status
  // (pending, running, passed, failed), stages: [{name, seconds, status}], failed_stage, message}.
  function smokeState(r) {
    if (!r) return 'none';
    return r.status === 'passed' || r.status === 'failed' ? r.status : 'running';
  }

  function smokePanel(card, alive, compact) {
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
        const r = await api('/smoke-test', { method: 'POST' });
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
            result = await api(`/smoke-test/${encodeURIComponent(testId)}?wait=20`);
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
      if (!testId) { fill(body, h('p', { class: 'muted small' }, 'No smoke test run from this browser yet.')); return; }
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
      /** runs: the runs list's rows, to show the newest smoke test when this browser started none. */
      refresh(runs) {
        if (!testId && Array.isArray(runs)) {
          const latest = runs.find((r) => r.preset === 'smoke-test');
          if (latest) { testId = String(latest.id); renderResult(); }
        }
        if (testId && !polling && (result === null || smokeState(result) === 'running')) follow();
      },
    };
  }

  function smokeView(root, alive) {
    const card = h('section', { class: 'card' });
    root.append(h('div', { class: 'page-head' }, h('h1', {}, 'Smoke test')), card);
    const panel = smokePanel(card, alive, false);
    return { async refresh() { panel.refresh(); return POLL_IDLE_MS; } };
  }

  // ---------------------------------------------------------------------------------------------
  // Charts (inline SVG)

  function niceStep(span, count) {
    const raw = span / Math.max(1, count);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const norm = raw / mag;
    return (norm >= 5 ? 10 : norm >= 2 ? 5 : norm >= 1 ? 2 : 1) * mag;
  }
  function linearTicks(min, max, count) {
    if (!(max > min)) return [min];
    const step = niceStep(max - min, count);
    const out = [];
    for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
    return out;
  }
  function logTicks(min, max) {
    for (const mult of [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 5], [1, 3], [1]]) {
      const out = [];
      for (let e = Math.floor(Math.log10(min)); e <= Math.ceil(Math.log10(max)); e++) {
        for (const m of mult) {
          const v = Number((m * Math.pow(10, e)).toPrecision(12));
          if (v >= min * (1 - 1e-9) && v <= max * (1 + 1e-9)) out.push(v);
        }
      }
      if (out.length <= 8) return out.length >= 2 ? out : linearTicks(min, max, 4).filter((v) => v > 0);
    }
    return [];
  }

  /**
   * A line chart. series: [{label, color, points: [[x, y], ...], dots?, width?}] sorted by x.
   * opts: {height, logY, yFormat, xLabel, yMin0, stacked?}. Returns a .chart element with
   * hover readout of every series at the nearest x.
   */
  function lineChart(series, opts = {}) {
    const wrap = h('div', { class: 'chart' });
    const draw = () => {
      const width = Math.max(240, wrap.clientWidth || 600);
      const height = opts.height || 220;
      const m = { l: 54, r: 12, t: 8, b: opts.xLabel ? 34 : 22 };
      const W = width - m.l - m.r;
      const H = height - m.t - m.b;
      const logY = !!opts.logY;
      const usable = series.map((sr) => sr.points.filter(([x, y]) => isNum(x) && isNum(y) && (!logY || y > 0)));
      const all = usable.flat();
      const svg = s('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': opts.title || 'chart' });
      fill(wrap, svg);
      if (!all.length) {
        svg.append(s('rect', { class: 'frame', x: m.l, y: m.t, width: W, height: H }),
          s('text', { class: 'no-data', x: m.l + W / 2, y: m.t + H / 2, 'text-anchor': 'middle', text: opts.empty || 'no data yet' }));
        return;
      }
      let x0 = Math.min(...all.map((p) => p[0])); let x1 = Math.max(...all.map((p) => p[0]));
      if (x1 === x0) { x0 -= 1; x1 += 1; }
      let y0 = Math.min(...all.map((p) => p[1])); let y1 = Math.max(...all.map((p) => p[1]));
      if (opts.yMin0 && !logY) y0 = Math.min(0, y0);
      if (opts.yMax1) y1 = Math.max(y1, 1);
      if (y1 === y0) { const d = logY ? y0 * 0.1 : Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
      if (logY) { y0 = Math.max(y0, Number.MIN_VALUE); } else if (!opts.yMin0) { const pad = (y1 - y0) * 0.04; y0 -= pad; y1 += pad; }
      const ly0 = logY ? Math.log10(y0) : y0; const ly1 = logY ? Math.log10(y1) : y1;
      const sx = (x) => m.l + ((x - x0) / (x1 - x0)) * W;
      const sy = (y) => m.t + H - (((logY ? Math.log10(y) : y) - ly0) / (ly1 - ly0)) * H;
      const yFmt = opts.yFormat || fmtNum;
      const grid = s('g', { class: 'axis' });
      for (const v of (logY ? logTicks(y0, y1) : linearTicks(y0, y1, Math.max(2, Math.round(H / 45))))) {
        const y = sy(v);
        if (y < m.t - 0.5 || y > m.t + H + 0.5) continue;
        grid.append(s('line', { class: 'gridline', x1: m.l, x2: m.l + W, y1: y, y2: y }),
          s('text', { x: m.l - 6, y: y + 3.5, 'text-anchor': 'end', text: yFmt(v) }));
      }
      const xTicks = linearTicks(x0, x1, Math.max(2, Math.round(W / 90))).filter((v) => !opts.integerX || Number.isInteger(v));
      for (const v of xTicks) {
        const x = sx(v);
        grid.append(s('line', { class: 'gridline', x1: x, x2: x, y1: m.t, y2: m.t + H }),
          s('text', { x, y: m.t + H + 14, 'text-anchor': 'middle', text: fmtNum(v) }));
      }
      svg.append(grid, s('rect', { class: 'frame', x: m.l, y: m.t, width: W, height: H }));
      if (opts.xLabel) svg.append(s('text', { class: 'axis-label', x: m.l + W / 2, y: height - 4, 'text-anchor': 'middle', text: opts.xLabel }));
      const clipId = 'clip' + Math.random().toString(36).slice(2);
      svg.append(s('defs', {}, s('clipPath', { id: clipId }, s('rect', { x: m.l, y: m.t - 2, width: W, height: H + 4 }))));
      const plot = s('g', { 'clip-path': `url(#${clipId})` });
      series.forEach((sr, i) => {
        const pts = usable[i];
        if (!pts.length) return;
        if (pts.length > 1 && !sr.dotsOnly) {
          plot.append(s('polyline', {
            class: 'series', stroke: sr.color, 'stroke-width': sr.width || 1.6,
            points: decimate(pts, W).map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(' '),
          }));
        }
        if (sr.dots || pts.length === 1 || sr.dotsOnly) {
          for (const [x, y] of pts.length > 400 ? [] : pts) plot.append(s('circle', { cx: sx(x), cy: sy(y), r: 2.8, fill: sr.color }));
        }
      });
      svg.append(plot);
      // hover readout
      const hover = s('line', { class: 'hover-line', y1: m.t, y2: m.t + H, visibility: 'hidden' });
      svg.append(hover);
      const tip = h('div', { class: 'chart-tip', hidden: true });
      wrap.append(tip);
      svg.addEventListener('mousemove', (ev) => {
        const rect = svg.getBoundingClientRect();
        const px = ev.clientX - rect.left;
        if (px < m.l || px > m.l + W) { hover.setAttribute('visibility', 'hidden'); tip.hidden = true; return; }
        const xv = x0 + ((px - m.l) / W) * (x1 - x0);
        const lines = [];
        let snapX = null;
        series.forEach((sr, i) => {
          const p = nearest(usable[i], xv);
          if (!p) return;
          if (snapX === null) snapX = p[0];
          lines.push(h('div', {}, h('span', { class: 'sw', style: { background: sr.color } }), `${sr.label}: ${yFmt(p[1])}`,
            p[0] !== snapX ? h('span', { class: 'muted' }, ` @${fmtNum(p[0])}`) : null));
        });
        if (snapX === null) return;
        hover.setAttribute('x1', sx(snapX)); hover.setAttribute('x2', sx(snapX)); hover.setAttribute('visibility', 'visible');
        fill(tip, h('div', { class: 'muted' }, `${opts.xName || 'step'} ${fmtNum(snapX)}`), ...lines);
        tip.hidden = false;
        const left = sx(snapX) + 12;
        tip.style.left = (left + tip.offsetWidth > width ? sx(snapX) - tip.offsetWidth - 12 : left) + 'px';
        tip.style.top = (m.t + 4) + 'px';
      });
      svg.addEventListener('mouseleave', () => { hover.setAttribute('visibility', 'hidden'); tip.hidden = true; });
    };
    wrap.redraw = draw;
    charts.add(wrap);
    requestAnimationFrame(draw);
    return wrap;
  }

  /** At most ~2 points per pixel column: keep each bucket's min and max (shape preserved). */
  function decimate(pts, width) {
    const buckets = Math.max(50, Math.floor(width));
    if (pts.length <= buckets * 2) return pts;
    const out = [];
    const per = pts.length / buckets;
    for (let b = 0; b < buckets; b++) {
      const chunk = pts.slice(Math.floor(b * per), Math.floor((b + 1) * per));
      if (!chunk.length) continue;
      let lo = chunk[0]; let hi = chunk[0];
      for (const p of chunk) { if (p[1] < lo[1]) lo = p; if (p[1] > hi[1]) hi = p; }
      if (lo[0] <= hi[0]) out.push(lo, hi); else out.push(hi, lo);
    }
    return out;
  }
  function nearest(pts, x) {
    if (!pts || !pts.length) return null;
    let lo = 0; let hi = pts.length - 1;
    while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (pts[mid][0] < x) lo = mid; else hi = mid; }
    return Math.abs(pts[lo][0] - x) <= Math.abs(pts[hi][0] - x) ? pts[lo] : pts[hi];
  }

  /** Stacked area of expert fractions vs step for one layer: steps [s], fractions [[f_e]]. */
  function stackedChart(steps, fractions, nExpert, opts = {}) {
    const wrap = h('div', { class: 'chart' });
    const draw = () => {
      const width = Math.max(200, wrap.clientWidth || 260);
      const height = opts.height || 110;
      const m = { l: 34, r: 6, t: 4, b: 18 };
      const W = width - m.l - m.r; const H = height - m.t - m.b;
      const svg = s('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': opts.title || 'router' });
      fill(wrap, svg);
      let x0 = steps[0]; let x1 = steps[steps.length - 1];
      const single = x1 === x0;
      if (single) { x0 -= 0.5; x1 += 0.5; }
      const sx = (x) => m.l + ((x - x0) / (x1 - x0)) * W;
      const sy = (f) => m.t + H - f * H;
      const axis = s('g', { class: 'axis' });
      for (const v of [0, 0.5, 1]) {
        axis.append(s('line', { class: 'gridline', x1: m.l, x2: m.l + W, y1: sy(v), y2: sy(v) }),
          s('text', { x: m.l - 4, y: sy(v) + 3.5, 'text-anchor': 'end', text: `${v * 100}%` }));
      }
      for (const v of linearTicks(x0, x1, Math.max(2, Math.round(W / 80))).filter(Number.isInteger)) {
        axis.append(s('text', { x: sx(v), y: m.t + H + 13, 'text-anchor': 'middle', text: fmtNum(v) }));
      }
      svg.append(axis);
      const idx = decimateIdx(steps.length, W);
      const xs = idx.map((i) => (single ? [x0, x1] : [steps[i]])).flat();
      const rows = idx.map((i) => (single ? [fractions[i], fractions[i]] : [fractions[i]])).flat();
      let lower = rows.map(() => 0);
      for (let e = 0; e < nExpert; e++) {
        const upper = rows.map((f, k) => lower[k] + (isNum(f[e]) ? f[e] : 0));
        const top = xs.map((x, k) => `${sx(x).toFixed(1)},${sy(Math.min(1, upper[k])).toFixed(1)}`);
        const bottom = xs.map((x, k) => `${sx(x).toFixed(1)},${sy(Math.min(1, lower[k])).toFixed(1)}`).reverse();
        svg.append(s('polygon', { points: top.concat(bottom).join(' '), fill: PALETTE[e % PALETTE.length], 'fill-opacity': 0.85 },
          s('title', { text: `expert ${e}` })));
        lower = upper;
      }
      svg.append(s('rect', { class: 'frame', x: m.l, y: m.t, width: W, height: H }));
    };
    wrap.redraw = draw;
    charts.add(wrap);
    requestAnimationFrame(draw);
    return wrap;
  }
  function decimateIdx(n, width) {
    const max = Math.max(40, Math.floor(width / 2));
    if (n <= max) return [...Array(n).keys()];
    const out = [];
    for (let k = 0; k < max; k++) out.push(Math.round((k * (n - 1)) / (max - 1)));
    return [...new Set(out)];
  }

  const charts = new Set();
  let resizeTimer = null;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { for (const c of charts) { if (c.isConnected) c.redraw(); else charts.delete(c); } }, 150);
  });

  // ---------------------------------------------------------------------------------------------
  // Run page

  function runView(root, alive, runId) {
    const base = `/runs/${encodeURIComponent(runId)}`;
    const st = {
      run: null, metrics: [], lastStep: -1, router: [], routerLast: -1, routerMissing: false,
      logScale: (() => { try { return localStorage.getItem('moejobs.logScale') === '1'; } catch (e) { return false; } })(),
      followLog: true, finalFetched: false,
    };

    const head = h('div', { class: 'page-head' });
    const failureBox = h('div', { class: 'alert bad', hidden: true });
    const warnBox = h('div', { class: 'alert warn', hidden: true });
    const tiles = h('div', { class: 'tiles' });
    const lossHolder = h('div', {});
    const smallHolder = h('div', { class: 'grid-3' });
    const routerCard = h('section', { class: 'card', hidden: true });
    const ckptBody = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
    const eventsBody = h('div', {}, h('p', { class: 'muted' }, 'Loading…'));
    const estimateBody = h('div', {});
    const logPre = h('pre', { class: 'log' }, 'Loading…');
    const configPre = h('pre', {}, 'Loading…');
    const logToggle = h('input', { type: 'checkbox', checked: true, onchange: (e) => { st.followLog = e.target.checked; } });
    const scaleToggle = h('input', {
      type: 'checkbox', checked: st.logScale || undefined,
      onchange: (e) => { st.logScale = e.target.checked; try { localStorage.setItem('moejobs.logScale', st.logScale ? '1' : '0'); } catch (x) { /* ignore */ } drawCharts(); },
    });

    root.append(
      head, failureBox, warnBox, tiles,
      h('section', { class: 'card', style: { marginBottom: '16px' } },
        h('div', { class: 'card-head' }, h('h2', {}, 'Loss'), h('span', { class: 'spacer' }),
          h('label', { class: 'toggle' }, scaleToggle, 'log scale')),
        lossHolder),
      h('div', { style: { marginBottom: '16px' } }, smallHolder),
      routerCard,
      h('div', { class: 'grid-2', style: { marginTop: '16px' } },
        h('section', { class: 'card' }, h('h2', {}, 'Checkpoints'), ckptBody),
        h('section', { class: 'card' }, h('h2', {}, 'Events'), eventsBody)),
      h('div', { class: 'grid-2', style: { marginTop: '16px' } },
        h('section', { class: 'card' }, h('h2', {}, 'Estimate'), estimateBody),
        h('section', { class: 'card' },
          h('div', { class: 'card-head' }, h('h2', {}, 'Log'), h('span', { class: 'muted small' }, `last ${LOG_TAIL} lines`),
            h('span', { class: 'spacer' }), h('label', { class: 'toggle' }, logToggle, 'follow')),
          logPre)),
      h('section', { class: 'card', style: { marginTop: '16px' } },
        h('details', {
          ontoggle: (e) => { if (e.target.open) api(`${base}/config`, { headers: { Accept: 'application/yaml, text/plain, application/json' } }).then((c) => { configPre.textContent = typeof c === 'string' ? c : JSON.stringify(c, null, 2); }).catch((x) => { configPre.textContent = x.message; }); },
        }, h('summary', {}, 'Resolved configuration'), configPre)));

    // -- header, tiles, alerts
    function renderHead() {
      const run = st.run;
      const live = !TERMINAL.has(run.status);
      const cancelBtn = live ? h('button', {
        class: 'btn btn-danger', type: 'button', disabled: run.cancel_requested || undefined,
        onclick: async (ev) => {
          if (!confirm(`Cancel run "${run.name}"? A running run stops after writing a checkpoint.`)) return;
          ev.target.disabled = true;
          try {
            st.run = await api(`${base}/cancel`, { method: 'POST' });
            toast(st.run.status === 'cancelled' ? 'Run cancelled.' : 'Cancel requested: the worker stops the run after its next checkpoint.', 'ok');
            refreshNow();
          } catch (e) { toast(`Cancel failed: ${e.message}`, 'bad'); ev.target.disabled = false; }
        },
      }, run.cancel_requested ? 'Cancelling…' : 'Cancel run') : null;
      fill(head, 
        h('a', { href: '#/', class: 'small' }, '← Runs'),
        h('div', { class: 'run-title' }, h('h1', {}, run.name || shortId(run.id)), badge(run.status, 'big'),
          run.preset ? h('span', { class: 'muted small' }, `preset ${run.preset}`) : null,
          h('span', { class: 'run-id', title: 'run id' }, run.id)),
        h('span', { class: 'spacer' }), cancelBtn);

      const reason = [run.failure_reason, run.failure_message].filter(Boolean);
      failureBox.hidden = !(run.status === 'failed' || (run.status === 'cancelled' && reason.length));
      if (!failureBox.hidden) {
        failureBox.className = 'alert ' + (run.status === 'failed' ? 'bad' : 'warn');
        fill(failureBox, h('b', {}, run.status === 'failed' ? `Failed${run.failure_reason ? ` (${run.failure_reason})` : ''}` : 'Cancelled'),
          run.failure_message ? h('div', { class: 'mono', style: { whiteSpace: 'pre-wrap', marginTop: '4px' } }, run.failure_message) : null,
          isNum(run.exit_code) ? h('div', { class: 'muted small' }, `exit code ${run.exit_code}`) : null);
      }
      const warnings = Array.isArray(run.warnings) ? run.warnings : [];
      warnBox.hidden = !warnings.length;
      if (warnings.length) {
        fill(warnBox, h('b', {}, warnings.length === 1 ? 'Warning' : `${warnings.length} warnings`),
          h('ul', {}, warnings.map((w) => h('li', {}, issueText(w)))));
      }
    }

    function tile(label, value, sub) {
      return h('div', { class: 'tile' }, h('div', { class: 'label' }, label), h('div', { class: 'value', title: String(value) }, value), sub ? h('div', { class: 'sub', title: String(sub) }, sub) : null);
    }

    function renderTiles() {
      const run = st.run;
      const last = st.metrics.length ? st.metrics[st.metrics.length - 1] : null;
      const total = stepsTotal(run);
      const done = last ? last.step : 0;
      let eta = null;
      if (last && total && isNum(last.elapsed_s) && last.step > 0 && !TERMINAL.has(run.status)) {
        eta = (last.elapsed_s / last.step) * Math.max(0, total - last.step);
      }
      const lastVal = [...st.metrics].reverse().find((r) => isNum(r.val_loss));
      const plan = (run.estimate && run.estimate.plan) || {};
      const tokens = last && isNum(last.tokens) ? last.tokens : null;
      fill(tiles, 
        h('div', { class: 'tile' }, h('div', { class: 'label' }, 'Steps'),
          h('div', { class: 'value' }, `${fmtInt(done)} / ${total ? fmtInt(total) : '?'}`),
          progressEl(done, total, run.status)),
        tile('Loss', last ? fmtNum(last.loss) : '–', lastVal ? `val ${fmtNum(lastVal.val_loss)} @ ${fmtInt(lastVal.step)}` : 'no validation yet'),
        tile('Tokens/s', last && isNum(last.tokens_per_sec) ? fmtSI(last.tokens_per_sec) : '–', last && isNum(last.mfu) ? `MFU ${(last.mfu * 100).toFixed(1)}%` : null),
        tile('Tokens', tokens !== null ? fmtSI(tokens) : '–', isNum(plan.tokens_trained) ? `of ${fmtSI(plan.tokens_trained)}` : null),
        tile('Elapsed', last && isNum(last.elapsed_s) ? fmtDuration(last.elapsed_s) : '–', eta !== null ? `ETA ${fmtDuration(eta)}` : null),
        tile('Worker', run.worker_id || '–', run.attempt ? `attempt ${run.attempt}` + (run.failures ? ` · ${run.failures} failed` : '') : null),
        tile('Created', fmtAgo(run.created_at), fmtTime(run.created_at).slice(5)),
        run.started_at
          ? tile(run.finished_at ? 'Wall time' : 'Running for', wallTime(run), run.finished_at ? `finished ${fmtAgo(run.finished_at)}` : `started ${fmtAgo(run.started_at)}`)
          : tile(TERMINAL.has(run.status) ? 'Never started' : 'Waiting', TERMINAL.has(run.status) ? '–' : fmtDuration((Date.now() - (parseTime(run.queued_at) || new Date()).getTime()) / 1000), TERMINAL.has(run.status) ? run.status : 'for a worker'));
    }

    function wallTime(run) {
      const start = parseTime(run.started_at);
      if (!start) return '–';
      const end = parseTime(run.finished_at) || new Date();
      return fmtDuration((end.getTime() - start.getTime()) / 1000);
    }

    // -- charts
    function series(key) { return st.metrics.filter((r) => isNum(r[key])).map((r) => [r.step, r[key]]); }
    function drawCharts() {
      const loss = series('loss');
      const val = series('val_loss');
      fill(lossHolder, 
        h('div', { class: 'legend' },
          h('span', {}, h('span', { class: 'sw', style: { background: PALETTE[0] } }), 'loss (train)'),
          h('span', {}, h('span', { class: 'sw', style: { background: PALETTE[1] } }), 'val_loss')),
        lineChart([
          { label: 'loss', color: PALETTE[0], points: loss },
          { label: 'val_loss', color: PALETTE[1], points: val, dots: true, width: 2 },
        ], { height: 280, logY: st.logScale, xLabel: 'optimizer step', title: 'loss vs step', integerX: true }));
      const small = (title, key, color, fmt) => h('section', { class: 'card' }, h('h3', {}, title),
        lineChart([{ label: title, color, points: series(key) }], { height: 150, yFormat: fmt, integerX: true, yMin0: key !== 'learning_rate' ? false : true, title }));
      fill(smallHolder, 
        small('learning rate', 'learning_rate', PALETTE[4], (v) => (v === 0 ? '0' : v.toExponential(1).replace('e+', 'e'))),
        small('tokens/s', 'tokens_per_sec', PALETTE[2], (v) => fmtSI(v)),
        small('grad norm', 'grad_norm', PALETTE[3]));
    }

    // -- router
    function drawRouter() {
      const rows = st.router;
      if (!rows.length) { routerCard.hidden = true; return; }
      routerCard.hidden = false;
      const layers = new Map(); // layer -> Map(step -> fractions[])
      let nExpert = 0;
      for (const r of rows) {
        if (!isNum(r.layer) || !isNum(r.expert) || !isNum(r.step)) continue;
        if (!layers.has(r.layer)) layers.set(r.layer, new Map());
        const bySteps = layers.get(r.layer);
        if (!bySteps.has(r.step)) bySteps.set(r.step, []);
        bySteps.get(r.step)[r.expert] = r.fraction;
        nExpert = Math.max(nExpert, r.expert + 1);
      }
      const cells = [...layers.keys()].sort((a, b) => a - b).map((layer) => {
        const bySteps = layers.get(layer);
        const steps = [...bySteps.keys()].sort((a, b) => a - b);
        const fr = steps.map((k) => bySteps.get(k));
        const latest = fr[fr.length - 1] || [];
        let maxE = 0;
        for (let e = 0; e < nExpert; e++) if ((latest[e] || 0) > (latest[maxE] || 0)) maxE = e;
        const maxF = latest[maxE] || 0;
        const dead = latest.filter((f, e) => isNum(f) && f < 0.1 / nExpert).length +
          Math.max(0, nExpert - latest.length) + latest.filter((f) => f === undefined).length;
        // Balanced routing gives every expert 1/n_expert of the assignments; one expert with
        // twice its share, or experts that get (almost) nothing, is the start of collapse.
        const hot = maxF * nExpert >= 2;
        const note = hot || dead
          ? h('span', { class: 'flag' }, [hot ? `e${maxE} ${(maxF * 100).toFixed(0)}%` : null, dead ? `${dead} idle` : null].filter(Boolean).join(', '))
          : h('span', { class: 'fine' }, `max ${(maxF * 100).toFixed(0)}%`);
        return h('div', { class: 'router-cell' }, h('h3', {}, h('span', {}, `layer ${layer}`), note),
          stackedChart(steps, fr, nExpert, { title: `layer ${layer} expert fractions` }));
      });
      fill(routerCard, 
        h('div', { class: 'card-head' }, h('h2', {}, 'Router: share of tokens per expert'), h('span', { class: 'spacer' }),
          h('span', { class: 'muted small' }, `balanced = ${(100 / Math.max(1, nExpert)).toFixed(1)}% each`)),
        h('div', { class: 'legend', style: { marginBottom: '8px' } },
          [...Array(nExpert).keys()].map((e) => h('span', {}, h('span', { class: 'sw box', style: { background: PALETTE[e % PALETTE.length] } }), `expert ${e}`))),
        h('div', { class: 'router-grid' }, cells));
    }

    // -- checkpoints, events, estimate, log
    function renderCheckpoints(list) {
      if (!list.length) { fill(ckptBody, h('p', { class: 'muted' }, 'No checkpoint yet.')); return; }
      // CheckpointPublic (service/api/models.py): {name, step, path, size_bytes, created_at, archive_url}
      fill(ckptBody, h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, h('th', {}, 'Checkpoint'), h('th', { class: 'num' }, 'Step'), h('th', { class: 'num' }, 'Size'), h('th', {}, 'Written'), h('th', {}, ''))),
        h('tbody', {}, list.map((c) => {
          const path = c.archive_url;
          const url = API_BASE + path;
          const file = `${shortId(runId)}-${c.name}.tar`;
          return h('tr', {},
            h('td', { class: 'mono' }, c.name),
            h('td', { class: 'num' }, isNum(c.step) ? fmtInt(c.step) : '–'),
            h('td', { class: 'num' }, fmtBytes(c.size_bytes)),
            h('td', {}, timeEl(c.created_at)),
            h('td', {}, h('a', { href: url, download: file, onclick: (ev) => downloadWithToken(ev, path, file) }, 'download .tar')));
        })))));
    }

    // The run's history (status changes, written by the service) and what its training
    // process reported (engine events from out/events.jsonl), in one list by time.
    function engineText(ev) {
      const label = String(ev.event || '').split('_').join(' ');
      return isNum(ev.step) ? `${label} (step ${fmtInt(ev.step)})` : label;
    }
    function renderEvents(events, engineEvents) {
      const items = [
        ...events.map((ev) => ({ at: parseTime(ev.at), kind: 'run', ev })),
        ...(engineEvents || []).map((ev) => ({ at: parseTime(ev.at), kind: 'engine', ev })),
      ].sort((a, b) => (a.at || 0) - (b.at || 0));
      if (!items.length) { fill(eventsBody, h('p', { class: 'muted' }, 'No events.')); return; }
      fill(eventsBody, h('ol', { class: 'timeline' }, items.map(({ kind, ev }) => (kind === 'engine'
        ? h('li', { class: 'engine' },
          h('div', { class: 'when' }, fmtTime(ev.at), ' · engine', isNum(ev.attempt) && ev.attempt ? ` · attempt ${ev.attempt}` : ''),
          h('div', {}, h('span', { class: 'engine-event' }, engineText(ev))),
          ev.message ? h('div', { class: 'msg' }, ev.message) : null)
        : h('li', { class: ev.to_status || '' },
          h('div', { class: 'when' }, fmtTime(ev.at), ev.actor ? ` · ${ev.actor}` : '', isNum(ev.attempt) && ev.attempt ? ` · attempt ${ev.attempt}` : ''),
          h('div', {}, ev.from_status && ev.from_status !== ev.to_status ? [badge(ev.from_status), ' → '] : null, badge(ev.to_status),
            ev.reason ? h('span', { class: 'muted' }, ` ${ev.reason}`) : null),
          ev.message ? h('div', { class: 'msg' }, ev.message) : null)))));
    }

    function renderEstimate(est) {
      if (!est || typeof est !== 'object') { fill(estimateBody, h('p', { class: 'muted' }, 'No estimate.')); return; }
      const plan = est.plan || {}; const params = est.params || {}; const mem = est.memory || {};
      const times = est.time_s && typeof est.time_s === 'object' ? Object.entries(est.time_s) : [];
      // expected time on each live worker kind (measured / scaled / datasheet / none), when admitted against the fleet
      const fleetTimes = est.fleet && Array.isArray(est.fleet.time) ? est.fleet.time.filter((e) => e && typeof e.kind === 'string') : [];
      const rows = [
        ['Parameters', isNum(params.total) ? `${fmtSI(params.total)} total, ${fmtSI(params.active)} active per token` : null],
        ['Optimizer steps', isNum(plan.optimizer_steps) ? `${fmtInt(plan.optimizer_steps)} × ${fmtSI(plan.tokens_per_step)} tokens (${plan.grad_accum_iters} micro-batch${plan.grad_accum_iters === 1 ? '' : 'es'} of ${plan.micro_batch_size} × ${plan.seq_len} per rank, ${plan.world_size} rank${plan.world_size === 1 ? '' : 's'})` : null],
        ['Warm-up', isNum(plan.warmup_steps) ? `${fmtInt(plan.warmup_steps)} steps` : null],
        ['Tokens trained', isNum(plan.tokens_trained) ? fmtSI(plan.tokens_trained) : null],
        ['FLOPs / token', isNum(est.flops_per_token) ? fmtSI(est.flops_per_token, 'FLOP') : null],
        ['Total compute', isNum(est.total_flops) ? fmtSI(est.total_flops, 'FLOP') : null],
        ['Memory / rank', isNum(mem.total) ? `${isNum(mem.total_cuda) ? `GPU ${fmtBytes(mem.total_cuda)}, CPU ${fmtBytes(mem.total_cpu)}` : fmtBytes(mem.total)} (weights ${fmtBytes(mem.weights)}, optimizer ${fmtBytes(mem.optimizer_states)}, activations ${fmtBytes(mem.activations)})` : null],
        ['Checkpoint', isNum(est.checkpoint_bytes) ? `${fmtBytes(est.checkpoint_bytes)} weights, ${fmtBytes(est.checkpoint_with_optimizer_bytes)} with optimizer; ${est.checkpoints_written} written` : null],
        ['Time', fleetTimes.length
          ? fleetTimes.map((e) => `${e.kind} ${isNum(e.time_s) ? fmtDuration(e.time_s) : 'no figure yet'} (${e.source})`).join(' · ')
          : (times.length ? times.map(([gpu, sec]) => `${gpu} ${fmtDuration(sec)}`).join(' · ') + (isNum(est.mfu) ? ` (datasheet, at ${(est.mfu * 100).toFixed(0)}% MFU)` : '') : null)],
      ].filter(([, v]) => v);
      fill(estimateBody, h('dl', { class: 'kv' }, rows.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])),
        h('details', { style: { marginTop: '10px' } }, h('summary', {}, 'all fields'), h('pre', {}, JSON.stringify(est, null, 2))));
    }

    /** text: GET /runs/{id}/logs answers text/plain (or the line saying why there is none). */
    function renderLog(text) {
      const atBottom = logPre.scrollTop + logPre.clientHeight >= logPre.scrollHeight - 8;
      logPre.textContent = text || '(empty)';
      if (st.followLog || atBottom) logPre.scrollTop = logPre.scrollHeight;
    }

    // -- data
    async function loadMetrics() {
      if (st.lastStep < 0) {
        // First load: server-side downsampled history; then only new rows.
        // MetricPage: {items: rows by step, next_after_step, total, downsampled}
        st.metrics = (await api(`${base}/metrics?limit=100000&max_points=2000`)).items;
        if (st.metrics.length) st.lastStep = st.metrics[st.metrics.length - 1].step;
        return true;
      }
      let added = false;
      for (let page = 0; page < 20; page++) {
        const rows = (await api(`${base}/metrics?after_step=${st.lastStep}&limit=1000`)).items;
        if (!rows.length) break;
        st.metrics.push(...rows);
        st.lastStep = rows[rows.length - 1].step;
        added = true;
        if (rows.length < 1000) break;
      }
      return added;
    }

    async function loadRouter() {
      if (st.routerMissing) return false;
      try {
        const q = st.routerLast >= 0 ? `?after_step=${st.routerLast}` : '';
        // RouterPage: {items: [{step, layer, expert, fraction}] by step, next_after_step}
        const rows = (await api(`${base}/router${q}`)).items;
        if (!rows.length) return false;
        st.router.push(...rows);
        st.routerLast = Math.max(...rows.map((r) => r.step));
        return true;
      } catch (e) {
        if (e.status === 404 || e.status === 405) st.routerMissing = true;
        return false;
      }
    }

    let first = true;
    return {
      async refresh() {
        let run;
        try { run = await api(base); } catch (e) {
          if (first || e.status === 404) {
            fill(root, h('div', { class: 'page-head' }, h('a', { href: '#/', class: 'small' }, '← Runs')),
              h('div', { class: 'alert bad' }, e.status === 404 ? `No run with id ${runId}.` : `Could not load the run: ${e.message}`));
            return e.status === 404 ? 60000 : POLL_IDLE_MS;
          }
          return POLL_IDLE_MS;
        }
        if (!alive()) return POLL_LIVE_MS;
        const wasTerminal = st.run && TERMINAL.has(st.run.status);
        st.run = run;
        document.title = `${run.name} · moejobs`;
        const terminal = TERMINAL.has(run.status);
        if (wasTerminal && st.finalFetched) { renderHead(); return POLL_IDLE_MS * 4; }
        renderHead();
        const [metricsChanged, routerChanged] = await Promise.all([
          loadMetrics().catch(() => false), loadRouter(),
        ]);
        const [ckpts, events, engineEvents, log] = await Promise.all([
          api(`${base}/checkpoints`).catch(() => null),
          api(`${base}/events`).catch(() => null),
          api(`${base}/engine-events`).catch(() => null),
          api(`${base}/logs?tail=${LOG_TAIL}`, { headers: { Accept: 'text/plain, application/json' } }).catch((e) => (e.status === 404 ? '(no log yet)' : `(log unavailable: ${e.message})`)),
        ]);
        if (!alive()) return POLL_LIVE_MS;
        renderTiles();
        if (metricsChanged || first) drawCharts();
        if (routerChanged || first) drawRouter();
        if (ckpts) renderCheckpoints(ckpts);
        if (events) renderEvents(events, engineEvents);
        if (first) renderEstimate(run.estimate);
        renderLog(log);
        first = false;
        if (terminal) st.finalFetched = true;
        return terminal ? POLL_IDLE_MS : POLL_LIVE_MS;
      },
    };
  }

  /** Archive links: a plain link when no token is needed. With a token (a link cannot send the
   *  header), ask the server for a signed, expiring link to that archive and follow it, so the
   *  browser streams the tar to disk instead of holding it in memory. */
  async function downloadWithToken(ev, path, file) {
    if (!getToken()) return; // the browser follows the plain link
    ev.preventDefault();
    try {
      const link = await api(path.replace(/\/archive$/, '/link'), { method: 'POST' });
      const a = h('a', { href: API_BASE + link.url, download: file });
      document.body.append(a); a.click(); a.remove();
      toast(`Downloading ${file}…`, 'ok');
    } catch (e) { toast(`Download failed: ${e.message}`, 'bad'); }
  }

  // ---------------------------------------------------------------------------------------------
  // Start

  document.getElementById('token-button').addEventListener('click', () => {
    askToken('', true).then((ok) => { if (ok) refreshNow(); });
  });
  window.addEventListener('hashchange', route);
  route();
}());
