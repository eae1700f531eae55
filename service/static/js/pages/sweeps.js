/* Sweeps: the list (#/sweeps) and one sweep (#/sweeps/<id>): its status and metric, the trials
 * table with the best trial highlighted, a parallel-coordinates plot (one axis per parameter,
 * the metric last) and a metric-vs-parameter scatter plot per parameter, cancel, delete and
 * "Compare trials" (the compare page with the trials' runs). GET /sweeps, GET /sweeps/{id}. */
import { cancelSweep, deleteSweep, getSweep, listSweeps } from '../api.js';
import { parallelCoords, rampColor, scatterChart, wantsLog } from '../charts.js';
import { refreshNow } from '../router.js';
import { badge, fill, fmtNum, h, isNum, POLL_IDLE_MS, POLL_LIVE_MS, shortId, timeEl, toast } from '../util.js';

const MAX_COMPARE = 20;
const ENDED = new Set(['finished', 'failed', 'cancelled']);

/** A sweep status's badge: running/finished/failed/cancelled drawn like a run's. */
function sweepBadge(status, extra = '') {
  return badge(status, `${status === 'finished' ? 'succeeded' : ''} ${extra}`.trim());
}
function countsText(counts) {
  return Object.entries(counts || {}).map(([k, n]) => `${n} ${k}`).join(', ') || 'no trials yet';
}
function valueText(v) { return isNum(v) ? fmtNum(v) : '–'; }
function paramText(v) { return v === null || v === undefined ? '–' : typeof v === 'string' ? v : isNum(v) ? fmtNum(v) : JSON.stringify(v); }
/** The last part of a dotted parameter path (the full path is in the title). */
function shortPath(path) { const parts = path.split('.'); return parts.slice(-1)[0]; }

export function sweepsView(root, alive) {
  const tbody = h('tbody', {}, h('tr', {}, h('td', { colspan: 7, class: 'empty' }, 'Loading…')));
  const errorBox = h('div', { class: 'alert bad', hidden: true });
  root.append(
    h('div', { class: 'page-head' }, h('h1', {}, 'Sweeps'), h('span', { class: 'spacer' }),
      h('a', { class: 'btn btn-primary', href: '#/sweeps/new', 'data-action': 'new-sweep' }, 'New sweep')),
    errorBox,
    h('section', { class: 'card' }, h('div', { class: 'table-wrap' }, h('table', { class: 'sweeps' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Status'), h('th', {}, 'Name'), h('th', {}, 'Method'), h('th', {}, 'Metric'),
        h('th', {}, 'Trials'), h('th', { class: 'num' }, 'Best'), h('th', {}, 'Created'))),
      tbody))));
  return {
    async refresh() {
      let page;
      try { page = await listSweeps(); } catch (e) {
        errorBox.hidden = false; errorBox.textContent = `Could not load sweeps: ${e.message}`;
        return POLL_IDLE_MS;
      }
      if (!alive()) return POLL_LIVE_MS;
      errorBox.hidden = true;
      if (!page.items.length) {
        fill(tbody, h('tr', {}, h('td', { colspan: 7, class: 'empty' }, 'No sweeps yet. ', h('a', { href: '#/sweeps/new' }, 'Start one'), '.')));
        return POLL_IDLE_MS;
      }
      fill(tbody, page.items.map((sw) => {
        const href = `#/sweeps/${encodeURIComponent(sw.id)}`;
        return h('tr', { class: 'clickable', 'data-sweep-id': sw.id, onclick: (ev) => { if (!ev.target.closest('a')) location.hash = href; } },
          h('td', {}, sweepBadge(sw.status)),
          h('td', { class: 'name', title: sw.name }, h('a', { href }, sw.name)),
          h('td', {}, sw.method),
          h('td', {}, `${sw.metric.name} (${sw.metric.goal})`),
          h('td', { class: 'small' }, countsText(sw.trial_counts)),
          h('td', { class: 'num' }, sw.best_trial ? `${valueText(sw.best_trial.best_value)} (#${sw.best_trial.number})` : '–'),
          h('td', {}, timeEl(sw.created_at)));
      }));
      return page.items.some((sw) => !ENDED.has(sw.status)) ? POLL_LIVE_MS : POLL_IDLE_MS;
    },
  };
}

export function sweepView(root, alive, sweepId) {
  const head = h('div', { class: 'page-head' });
  const info = h('div', { class: 'tiles' });
  const reasonBox = h('div', { class: 'alert warn', hidden: true });
  const trialsBody = h('div', { class: 'table-wrap' });
  const pcHolder = h('div', { id: 'sweep-parallel' });
  const scatterHolder = h('div', { class: 'grid-3', id: 'sweep-scatter' });
  let sweep = null;
  let drawnKey = '';

  root.append(head, reasonBox, info,
    h('section', { class: 'card', style: { marginBottom: '16px' } },
      h('div', { class: 'card-head' }, h('h2', {}, 'Parameters → metric'), h('span', { class: 'spacer' }),
        h('span', { class: 'muted small' }, 'one line per trial with a value; green is best, the best trial drawn bold')),
      pcHolder),
    h('div', { style: { marginBottom: '16px' } }, scatterHolder),
    h('section', { class: 'card' }, h('h2', {}, 'Trials'), trialsBody));

  const paths = () => Object.keys((sweep.spec && sweep.spec.parameters) || {}).concat(
    // parameters of trials not in the spec (never expected; shown all the same)
    [...new Set(sweep.trials.flatMap((t) => Object.keys(t.params || {})))].filter((k) => !(sweep.spec.parameters || {})[k]));
  const distribution = (path) => { const p = (sweep.spec.parameters || {})[path]; return p && p.distribution; };
  const runHref = (t) => `#/runs/${encodeURIComponent(t.run_id)}`;

  /** Trials with a value, best first, and their colours on the green (best) to red ramp. */
  function ranked() {
    const sign = sweep.metric.goal === 'maximize' ? -1 : 1;
    const valued = sweep.trials.filter((t) => isNum(t.best_value)).sort((a, b) => sign * (a.best_value - b.best_value) || a.number - b.number);
    const colors = new Map(valued.map((t, i) => [t.number, rampColor(valued.length > 1 ? i / (valued.length - 1) : 0)]));
    return { valued, colors };
  }

  function renderHead() {
    const ended = ENDED.has(sweep.status);
    const withRuns = ranked().valued.concat(sweep.trials.filter((t) => !isNum(t.best_value))).filter((t) => t.run_id && t.status !== 'deleted');
    fill(head,
      h('a', { href: '#/sweeps', class: 'small' }, '← Sweeps'),
      h('div', { class: 'run-title' }, h('h1', {}, sweep.name), sweepBadge(sweep.status, 'big'),
        h('span', { class: 'run-id', title: 'sweep id' }, sweep.id)),
      h('span', { class: 'spacer' }),
      h('button', {
        class: 'btn', type: 'button', 'data-action': 'compare-trials', disabled: withRuns.length < 2 || undefined,
        title: withRuns.length < 2 ? 'needs two trials with a run' : `the compare page with ${Math.min(MAX_COMPARE, withRuns.length)} trials' runs (best first)`,
        onclick: () => { location.hash = `#/compare?runs=${withRuns.slice(0, MAX_COMPARE).map((t) => encodeURIComponent(t.run_id)).join(',')}`; },
      }, 'Compare trials'),
      ended ? null : h('button', {
        class: 'btn btn-danger', type: 'button', 'data-action': 'cancel-sweep', disabled: sweep.cancel_requested || undefined,
        onclick: async (ev) => {
          if (!confirm(`Cancel sweep "${sweep.name}"? No more trials start; its queued and running runs are cancelled.`)) return;
          ev.target.disabled = true;
          try { sweep = await cancelSweep(sweepId); toast('Sweep cancelled.', 'ok'); refreshNow(); } catch (e) { toast(`Cancel failed: ${e.message}`, 'bad'); ev.target.disabled = false; }
        },
      }, sweep.cancel_requested ? 'Cancelling…' : 'Cancel sweep'),
      ended ? h('button', {
        class: 'btn btn-danger', type: 'button', 'data-action': 'delete-sweep',
        onclick: async (ev) => {
          if (!confirm(`Delete sweep "${sweep.name}"? Its trial records go; its runs stay as ordinary runs.`)) return;
          ev.target.disabled = true;
          try { await deleteSweep(sweepId); toast(`Sweep "${sweep.name}" deleted.`, 'ok'); location.hash = '#/sweeps'; } catch (e) { toast(`Delete failed: ${e.message}`, 'bad'); ev.target.disabled = false; }
        },
      }, 'Delete') : null);
    reasonBox.hidden = !sweep.end_reason;
    reasonBox.textContent = sweep.end_reason || '';
    const best = sweep.best_trial;
    const tile = (label, value, sub) => h('div', { class: 'tile' }, h('div', { class: 'label' }, label), h('div', { class: 'value', title: String(value) }, value), sub ? h('div', { class: 'sub', title: String(sub) }, sub) : null);
    fill(info,
      tile('Metric', sweep.metric.name, sweep.metric.goal),
      tile('Method', sweep.method, sweep.seed !== null && sweep.seed !== undefined ? `seed ${sweep.seed}` : null),
      tile('Trials', String(sweep.trials.length), countsText(sweep.trial_counts)),
      tile('Runs', `${sweep.max_runs ?? sweep.trials.length} max`, `${sweep.max_concurrent} at a time`),
      tile('Best', best ? valueText(best.best_value) : '–', best ? `trial #${best.number}` : 'no succeeded trial yet'),
      tile('Created', timeEl(sweep.created_at), sweep.finished_at ? 'ended' : null));
  }

  function renderTrials() {
    const ps = paths();
    const bestNo = sweep.best_trial ? sweep.best_trial.number : null;
    const { colors } = ranked();
    fill(trialsBody, h('table', { class: 'trials' },
      h('thead', {}, h('tr', {}, h('th', { class: 'num' }, '#'), ps.map((p) => h('th', { title: p }, shortPath(p))),
        h('th', {}, 'Status'), h('th', { class: 'num' }, `final ${sweep.metric.name}`), h('th', { class: 'num' }, `best ${sweep.metric.name}`), h('th', {}, 'Run'))),
      h('tbody', {}, sweep.trials.map((t) => h('tr', { class: t.number === bestNo ? 'best' : '', 'data-trial': t.number },
        h('td', { class: 'num' }, colors.has(t.number) ? h('span', { class: 'sw', style: { background: colors.get(t.number) } }) : null, String(t.number)),
        ps.map((p) => h('td', { class: 'mono' }, paramText((t.params || {})[p]))),
        h('td', {}, badge(t.status), t.cancel_reason ? h('span', { class: 'muted small' }, ` ${t.cancel_reason}`) : null,
          t.errors && t.errors.length ? h('div', { class: 'small muted', title: t.errors.map((e) => e.msg).join('\n') }, t.errors[0].msg) : null,
          t.number === bestNo ? h('span', { class: 'best-mark' }, ' best') : null),
        h('td', { class: 'num' }, valueText(t.final_value)),
        h('td', { class: 'num' }, valueText(t.best_value)),
        h('td', {}, t.run_id && t.status !== 'deleted' ? h('a', { href: runHref(t), class: 'mono' }, shortId(t.run_id)) : '–'))))));
  }

  function renderPlots() {
    const ps = paths();
    const { valued, colors } = ranked();
    const bestNo = sweep.best_trial ? sweep.best_trial.number : null;
    // redraw only when a value changed (the plots keep their hover state between polls)
    const key = JSON.stringify([ps, valued.map((t) => [t.number, t.best_value]), bestNo]);
    if (key === drawnKey) return;
    drawnKey = key;
    const metricKey = `metric:${sweep.metric.name}`;
    const axes = ps.map((p) => ({ key: p, label: p, log: wantsLog(valued.map((t) => (t.params || {})[p]), distribution(p)) }));
    axes.push({ key: metricKey, label: `${sweep.metric.name} (${sweep.metric.goal === 'maximize' ? 'max' : 'min'})`, log: false });
    const label = (t) => `trial #${t.number}: ${ps.map((p) => `${shortPath(p)}=${paramText((t.params || {})[p])}`).join(', ')}; ${sweep.metric.name} ${valueText(t.best_value)}`;
    const open = (t) => (t.run_id ? () => { location.hash = runHref(t); } : undefined);
    fill(pcHolder, parallelCoords(axes, valued.map((t) => ({
      values: Object.assign({ [metricKey]: t.best_value }, t.params), color: colors.get(t.number),
      label: label(t), best: t.number === bestNo, onclick: open(t),
    })), { height: 300, title: 'parallel coordinates', empty: 'no trial has a value of the metric yet' }));
    fill(scatterHolder, ps.map((p, i) => h('section', { class: 'card' }, h('h3', { title: p }, `${sweep.metric.name} vs ${shortPath(p)}`),
      scatterChart(valued.map((t) => ({ x: (t.params || {})[p], y: t.best_value, color: colors.get(t.number), label: label(t), best: t.number === bestNo, onclick: open(t) })),
        { xLabel: shortPath(p) + (axes[i].log ? ' (log)' : ''), xLog: axes[i].log, title: `${sweep.metric.name} vs ${p}` }))));
  }

  return {
    async refresh() {
      try { sweep = await getSweep(sweepId); } catch (e) {
        if (sweep && e.status !== 404) return POLL_IDLE_MS; // keep the page through a blip
        fill(root, h('div', { class: 'page-head' }, h('a', { href: '#/sweeps', class: 'small' }, '← Sweeps')),
          h('div', { class: 'alert bad' }, e.status === 404 ? `No sweep with id ${sweepId}.` : `Could not load the sweep: ${e.message}`));
        return e.status === 404 ? 60000 : POLL_IDLE_MS;
      }
      if (!alive()) return POLL_LIVE_MS;
      document.title = `${sweep.name} · sweep · moejobs`;
      renderHead(); renderTrials(); renderPlots();
      return ENDED.has(sweep.status) ? POLL_IDLE_MS * 4 : POLL_LIVE_MS;
    },
  };
}
