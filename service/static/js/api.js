/* The API client: fetch with the token, the token dialog, the connection indicator, and one
 * function per route the dashboard calls. Each reads only the documented response shapes
 * (service/api/models.py; errors: ErrorBody in service/api/openapi.py).
 *
 * API token: when the API answers 401 the token dialog opens (once for all pending requests);
 * the token is kept in localStorage and sent as "Authorization: Bearer <token>".
 */
import { fill, h, query, toast } from './util.js';

// The API lives next to this page: the page is GET /, so "/runs" etc. A reverse proxy that
// serves everything under a prefix keeps working (the page's folder is the prefix).
export const API_BASE = location.pathname.replace(/[^/]*$/, '').replace(/\/$/, '');
const TOKEN_KEY = 'moejobs.apiToken';

export class ApiError extends Error {
  constructor(status, message, body) { super(message); this.status = status; this.body = body; }
}
let tokenPrompt = null;       // pending dialog promise shared by concurrent 401s
let tokenDeclined = false;    // the user closed the dialog: do not reopen it on every poll
let tokenSaved = () => {};    // what to do after the banner's dialog saved a token (onTokenSaved)

export function getToken() { try { return localStorage.getItem(TOKEN_KEY) || ''; } catch (e) { return ''; } }
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
export async function api(path, opts = {}) {
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

export function askToken(reason, force = false) {
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
      h('button', { class: 'btn btn-small', type: 'button', onclick: () => askToken('', true).then((ok) => ok && tokenSaved()) }, 'Enter token'));
  }
}

function setConn(kind, text) {
  const el = document.getElementById('conn');
  el.className = 'conn ' + kind;
  el.textContent = text;
}

/** Archive links: a plain link when no token is needed. With a token (a link cannot send the
 *  header), ask the server for a signed, expiring link to that archive and follow it, so the
 *  browser streams the tar to disk instead of holding it in memory. */
export async function downloadWithToken(ev, path, file) {
  if (!getToken()) return; // the browser follows the plain link
  ev.preventDefault();
  try {
    const [archive, query] = path.split('?');
    const linkPath = archive.replace(/\/archive$/, '/link') + (query ? `?${query}` : '');
    const link = await api(linkPath, { method: 'POST' }); // the variant travels in the link's query
    const a = h('a', { href: API_BASE + link.url, download: file });
    document.body.append(a); a.click(); a.remove();
    toast(`Downloading ${file}…`, 'ok');
  } catch (e) { toast(`Download failed: ${e.message}`, 'bad'); }
}

/** fn() runs after a token entered from the banner was saved (the router refreshes the view). */
export function onTokenSaved(fn) { tokenSaved = fn; }

/** A download of a file the browser already holds (a Blob): an object URL, clicked, revoked. */
export function saveBlob(blob, file) {
  const url = URL.createObjectURL(blob);
  const a = h('a', { href: url, download: file });
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---------------------------------------------------------------------------------------------
// Routes. Answers: RunPublic, RunPage, RunCreated, ValidationReport, MetricPage, RouterPage,
// CheckpointPublic, EventPublic, EngineEventPublic, WorkerPublic, SmokeTestPublic,
// SmokeTestPage, PresetPublic (service/api/models.py).

const runPath = (id) => `/runs/${encodeURIComponent(id)}`;

/** GET /runs: RunPage {items: [RunPublic], next_cursor}. */
export function listRuns(params) { return api(`/runs?${query(params)}`); }
/** GET /runs/{id}: RunPublic. */
export function getRun(id) { return api(runPath(id)); }
/** DELETE /runs/{id} (finished runs only; 409 otherwise): nothing. */
export function deleteRun(id) { return api(runPath(id), { method: 'DELETE' }); }
/** POST /runs/{id}/cancel: RunPublic. */
export function cancelRun(id) { return api(`${runPath(id)}/cancel`, { method: 'POST' }); }
/** GET /runs/{id}/config: {train_config, model_config} as YAML text (resolved, or as submitted). */
export function runConfigYaml(id, submitted = false) {
  return api(`${runPath(id)}/config${submitted ? '?submitted=true' : ''}`, { headers: { Accept: 'application/yaml, text/plain, application/json' } });
}
/** GET /runs/{id}/metrics: MetricPage {items: [MetricRow], next_after_step, total, downsampled}. */
export function runMetrics(id, params) { return api(`${runPath(id)}/metrics?${query(params)}`); }
/** GET /runs/{id}/metrics?format=csv: metrics.csv's header and rows, as text. */
export function runMetricsCsv(id, params) {
  return api(`${runPath(id)}/metrics?${query(Object.assign({ format: 'csv' }, params))}`, { headers: { Accept: 'text/csv' } });
}
/** GET /runs/{id}/router: RouterPage {items: [{step, layer, expert, fraction}], next_after_step}. */
export function runRouter(id, params) { return api(`${runPath(id)}/router?${query(params || {})}`); }
/** GET /runs/{id}/checkpoints: [CheckpointPublic]. */
export function runCheckpoints(id) { return api(`${runPath(id)}/checkpoints`); }
/** GET /runs/{id}/events: [EventPublic]. */
export function runEvents(id) { return api(`${runPath(id)}/events`); }
/** GET /runs/{id}/engine-events: [EngineEventPublic]. */
export function runEngineEvents(id) { return api(`${runPath(id)}/engine-events`); }
/** GET /runs/{id}/logs?tail=N: text/plain. */
export function runLog(id, tail) {
  return api(`${runPath(id)}/logs?tail=${tail}`, { headers: { Accept: 'text/plain, application/json' } });
}
/** GET /workers: [WorkerPublic]. */
export function listWorkers() { return api('/workers'); }
/** GET /presets: [PresetPublic {name, train_config, model_config}]. */
export function listPresets() { return api('/presets'); }
/** GET /smoke-tests: SmokeTestPage {items: [SmokeTestPublic], newest first}. */
export function listSmokeTests(limit = 10) { return api(`/smoke-tests?limit=${limit}`); }
/** POST /smoke-test: SmokeTestPublic (409 with run_id while one runs). */
export function startSmokeTest() { return api('/smoke-test', { method: 'POST' }); }
/** GET /smoke-test/{id}?wait=S: SmokeTestPublic. */
export function getSmokeTest(id, wait) { return api(`/smoke-test/${encodeURIComponent(id)}?wait=${wait}`); }

/** The multipart form of POST /runs and /runs/validate: the two documents as files (YAML, or
 *  JSON when the text starts with "{": the server parses both), name and preset. */
function runForm({ name, preset, train, model }) {
  const form = new FormData();
  const file = (text) => {
    const json = /^\s*\{/.test(text);
    return [new Blob([text], { type: json ? 'application/json' : 'application/yaml' }), json ? 'doc.json' : 'doc.yaml'];
  };
  form.append('train_config', ...file(train));
  form.append('model_config', ...file(model));
  if (name) form.append('name', name);
  if (preset) form.append('preset', preset);
  return form;
}
/** POST /runs/validate: ValidationReport {valid, errors: [{loc, msg}], warnings, estimate, resolved}. */
export function validateRun(doc) { return api('/runs/validate', { method: 'POST', body: runForm(doc) }); }
/** POST /runs: RunCreated (201); a 422 ApiError's body has errors: [{loc, msg}]. */
export function submitRun(doc, key) {
  return api('/runs', { method: 'POST', body: runForm(doc), headers: key ? { 'Idempotency-Key': key } : {} });
}

// ---------------------------------------------------------------------------------------------
// Many runs: tags and notes, comparison, sweeps. Answers: RunPublic, Comparison, SeriesPage,
// SweepPage, SweepPublic, SweepValidation (service/api/models.py).

/** GET /runs with the list's filters: status, name (substring, any case), tags (every one),
 *  limit, cursor. RunPage {items, next_cursor}. */
export function filterRuns({ status, name, tags, limit, cursor }) {
  const q = new URLSearchParams(query({ status, name, limit, cursor }));
  for (const t of tags || []) q.append('tag', t);
  return api(`/runs?${q.toString()}`);
}
/** PATCH /runs/{id}: change {tags?, add_tags?, remove_tags?, note?}; RunPublic. A 422's body
 *  names the field (errors: [{loc: ["body", "add_tags"], msg}]). */
export function patchRun(id, change) {
  return api(runPath(id), { method: 'PATCH', body: JSON.stringify(change), headers: { 'Content-Type': 'application/json' } });
}
/** GET /compare?runs=A,B: Comparison {runs: [ComparedRun], differences: [{key, values}], left_out}. */
export function compareRuns(ids) { return api(`/compare?runs=${ids.map(encodeURIComponent).join(',')}`); }
/** GET /compare/metrics: SeriesPage {columns, series: [{run_id, name, step, values: {col: [..]}}]}. */
export function compareMetrics(ids, columns, points = 1000) {
  return api(`/compare/metrics?${query({ runs: ids.join(','), columns: columns.join(','), points })}`);
}

const sweepPath = (id) => `/sweeps/${encodeURIComponent(id)}`;
/** The body of POST /sweeps and /sweeps/validate: the editor's text, JSON when it starts with
 *  "{", YAML otherwise (the server parses both). */
function sweepBody(text) {
  const json = /^\s*\{/.test(text);
  return { method: 'POST', body: text, headers: { 'Content-Type': json ? 'application/json' : 'application/yaml' } };
}
/** GET /sweeps: SweepPage {items: [SweepSummary]}. */
export function listSweeps(limit = 100) { return api(`/sweeps?limit=${limit}`); }
/** GET /sweeps/{id}: SweepPublic (SweepSummary + spec, trials). */
export function getSweep(id) { return api(sweepPath(id)); }
/** POST /sweeps/{id}/cancel: SweepPublic. */
export function cancelSweep(id) { return api(`${sweepPath(id)}/cancel`, { method: 'POST' }); }
/** DELETE /sweeps/{id} (ended sweeps only; 409 otherwise): nothing. */
export function deleteSweep(id) { return api(sweepPath(id), { method: 'DELETE' }); }
/** POST /sweeps/validate: SweepValidation {valid, errors: [{loc, msg}], warnings, points}. */
export function validateSweep(text) { return api('/sweeps/validate', sweepBody(text)); }
/** POST /sweeps: SweepPublic (201); a 422 ApiError's body has errors: [{loc, msg}]. */
export function createSweep(text) { return api('/sweeps', sweepBody(text)); }
