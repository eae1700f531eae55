/* Shared helpers of the dashboard: constants, DOM building, formatting, the toast. No imports. */

// A run's statuses and the terminal ones: service.models.RunStatus and TERMINAL_STATUSES
// (tests/service/test_dashboard.py checks that these two lines say the same).
export const STATUSES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];
export const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
export const POLL_LIVE_MS = 3000;
export const POLL_IDLE_MS = 15000;
export const LOG_TAIL = 300;
export const PALETTE = ['#2f6fde', '#e4572e', '#17a398', '#f2a541', '#8f5bd6', '#d1495b', '#3aa655',
  '#7a8a9e', '#00a6ed', '#c97b2d', '#b5446e', '#5c7aea', '#6a994e', '#9a6fb0', '#e07a5f', '#3d5a80'];

// ---------------------------------------------------------------------------------------------
// DOM and formatting helpers

/** h('div', {class: 'x', onclick: fn}, child, 'text', [more]) -> Element. */
export function h(tag, attrs, ...children) {
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
export function fill(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}
export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}
// The SVG namespace, taken from an element the HTML parser made (no URL literal needed).
const SVG_NS = (() => { const t = document.createElement('template'); t.innerHTML = '<svg></svg>'; return t.content.firstChild.namespaceURI; })();
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key === 'text') el.textContent = value;
    else el.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) if (child) el.append(child);
  return el;
}

export function isNum(v) { return typeof v === 'number' && Number.isFinite(v); }
export function fmtNum(v, digits = 4) {
  if (!isNum(v)) return '–';
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(2).replace('e+', 'e');
  return Number(v.toPrecision(digits)).toString();
}
export function fmtInt(v) { return isNum(v) ? Math.round(v).toLocaleString('en-US') : '–'; }
export function fmtSI(v, unit = '') {
  if (!isNum(v)) return '–';
  const units = ['', 'k', 'M', 'G', 'T', 'P', 'E'];
  let i = 0; let x = Math.abs(v);
  while (x >= 1000 && i < units.length - 1) { x /= 1000; i++; }
  const text = x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2);
  return (v < 0 ? '-' : '') + text + ' ' + units[i] + unit;
}
export function fmtBytes(v) {
  if (!isNum(v)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0; let x = v;
  while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
  return (i === 0 ? x.toFixed(0) : x.toFixed(x >= 100 ? 0 : 1)) + ' ' + units[i];
}
export function fmtDuration(sec) {
  if (!isNum(sec)) return '–';
  sec = Math.max(0, sec);
  if (sec < 60) return sec.toFixed(sec < 10 ? 1 : 0) + ' s';
  const m = Math.floor(sec / 60); const ss = Math.round(sec % 60);
  if (m < 60) return `${m} min ${ss} s`;
  const hh = Math.floor(m / 60); const mm = m % 60;
  if (hh < 48) return `${hh} h ${mm} min`;
  return `${Math.floor(hh / 24)} d ${hh % 24} h`;
}
export function parseTime(iso) {
  if (!iso) return null;
  // Naive timestamps from the API are UTC.
  const text = /[zZ]|[+-]\d\d:?\d\d$/.test(iso) ? iso : iso + 'Z';
  const t = new Date(text);
  return Number.isNaN(t.getTime()) ? null : t;
}
function pad(n) { return String(n).padStart(2, '0'); }
export function fmtTime(iso) {
  const t = parseTime(iso);
  if (!t) return '–';
  return `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())} ` +
    `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}`;
}
export function fmtAgo(iso) {
  const t = parseTime(iso);
  if (!t) return '–';
  const sec = (Date.now() - t.getTime()) / 1000;
  if (sec < 5) return 'just now';
  if (sec < 60) return `${Math.round(sec)} s ago`;
  if (sec < 3600) return `${Math.round(sec / 60)} min ago`;
  if (sec < 86400) return `${Math.round(sec / 3600)} h ago`;
  return fmtTime(iso).slice(0, 10);
}
export function timeEl(iso, relative = true) {
  return h('time', { datetime: iso || '', title: fmtTime(iso) }, relative ? fmtAgo(iso) : fmtTime(iso));
}
export function badge(status, extra = '') {
  return h('span', { class: `badge ${status || ''} ${extra}`.trim() }, status || 'unknown');
}
export function shortId(id) { return String(id || '').slice(0, 8); }
/** A config warning ({loc, msg}: IssueOut in service/api/models.py) as "train.max_tokens: msg". */
export function issueText(w) {
  const loc = w.loc.map((p) => (typeof p === 'number' ? `[${p}]` : p)).join('.').replace(/\.\[/g, '[');
  return loc ? `${loc}: ${w.msg}` : w.msg;
}
export function stepsTotal(run) {
  const plan = run && run.estimate && run.estimate.plan;
  return plan && isNum(plan.optimizer_steps) ? plan.optimizer_steps : null;
}

let toastTimer = null;
export function toast(text, kind = '') {
  const el = document.getElementById('toast');
  el.className = 'toast ' + kind;
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, 6000);
}

// ---------------------------------------------------------------------------------------------
// Latest metric row per run (runs list): the API sends it with each run (latest_metrics).

export function latestMetric(run) {
  const row = run && run.latest_metrics;
  return row && isNum(row.step) ? row : null;
}

export function progressEl(done, total, status) {
  const pct = total ? Math.min(100, (100 * (done || 0)) / total) : 0;
  const cls = status === 'succeeded' ? 'done' : status === 'failed' ? 'bad' : '';
  return h('div', { class: 'progress' },
    h('div', { class: 'bar ' + cls }, h('span', { style: { width: pct.toFixed(1) + '%' } })),
    h('span', { class: 'txt' }, `${isNum(done) ? fmtInt(done) : 0} / ${total ? fmtInt(total) : '?'}`));
}

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') q.set(k, v);
  return q.toString();
}

// ---------------------------------------------------------------------------------------------
// The loss curves' EMA smoothing (run page and compare page share the value, kept in the browser)

export const SMOOTHING_KEY = 'moejobs.smoothing';
export function clampSmoothing(v) { return Number.isFinite(v) ? Math.min(0.99, Math.max(0, v)) : 0; }
export function savedSmoothing() {
  try { return clampSmoothing(Number(localStorage.getItem(SMOOTHING_KEY) || 0)); } catch (e) { return 0; }
}
/** The smoothing slider (input#smoothing, 0 to 0.99) and its value; onchange(w) after a move. */
export function smoothingControl(value, onchange) {
  const shown = h('span', { class: 'mono small smooth-value' }, value.toFixed(2));
  const slider = h('input', {
    type: 'range', min: 0, max: 0.99, step: 0.01, value: String(value), id: 'smoothing', 'aria-label': 'smoothing',
    oninput: (e) => {
      const w = clampSmoothing(Number(e.target.value));
      shown.textContent = w.toFixed(2);
      try { localStorage.setItem(SMOOTHING_KEY, String(w)); } catch (x) { /* private mode */ }
      onchange(w);
    },
  });
  return h('label', { class: 'toggle smoothing', title: 'exponential moving average of the loss curves; the raw curve stays faint behind' }, 'smoothing ', slider, shown);
}

/** A run's tags as small chips; onpick(tag), when given, makes each a button. */
export function tagChips(tags, onpick) {
  return h('span', { class: 'tags' }, (tags || []).map((t) => (onpick
    ? h('button', { class: 'tag', type: 'button', title: `only runs tagged ${t}`, 'data-tag': t, onclick: (ev) => { ev.stopPropagation(); onpick(t); } }, t)
    : h('span', { class: 'tag', 'data-tag': t }, t))));
}
