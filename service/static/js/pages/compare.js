/* The compare page (#/compare?runs=A,B,...): the runs' loss, validation loss, learning rate and
 * tokens/s overlaid (one colour per run, PALETTE order; the EMA smoothing applies to the loss
 * overlay), the final and best metrics per run, and the resolved config keys whose values differ
 * (GET /compare and GET /compare/metrics). */
import { compareMetrics, compareRuns } from '../api.js';
import { ema, lineChart } from '../charts.js';
import { badge, fill, fmtInt, fmtNum, fmtSI, h, isNum, PALETTE, POLL_IDLE_MS, POLL_LIVE_MS, savedSmoothing, shortId, smoothingControl, tagChips, TERMINAL } from '../util.js';

const COLUMNS = ['loss', 'val_loss', 'learning_rate', 'tokens_per_sec'];
const POINTS = 1000;

export function colorOf(i) { return PALETTE[i % PALETTE.length]; }

export function compareView(root, alive, ids) {
  const st = { smoothing: savedSmoothing(), comparison: null, series: [] };
  const legend = h('div', { class: 'legend compare-legend' });
  const lossHolder = h('div', {});
  const smallHolder = h('div', { class: 'grid-3 compare-small' });
  const summary = h('div', { class: 'table-wrap' });
  const diffs = h('div', { class: 'table-wrap' });
  const errorBox = h('div', { class: 'alert bad', hidden: true });
  const smoothing = smoothingControl(st.smoothing, (w) => { st.smoothing = w; drawLoss(); });

  root.append(
    h('div', { class: 'page-head' }, h('a', { href: '#/', class: 'small' }, '← Runs'), h('h1', {}, `Compare ${ids.length} runs`)),
    errorBox, legend,
    h('section', { class: 'card', style: { marginBottom: '16px' } },
      h('div', { class: 'card-head' }, h('h2', {}, 'Loss (train)'), h('span', { class: 'spacer' }), smoothing), lossHolder),
    h('div', { style: { marginBottom: '16px' } }, smallHolder),
    h('section', { class: 'card', style: { marginBottom: '16px' } }, h('h2', {}, 'Final and best metrics'), summary),
    h('section', { class: 'card' }, h('h2', {}, 'Config keys that differ'), diffs));

  const name = (i) => (st.comparison ? st.comparison.runs[i].name : shortId(ids[i]));
  /** points [[step, value]] of one run's column (GET /compare/metrics is column-wise). */
  function points(i, column) {
    const sr = st.series[i];
    if (!sr || !sr.values[column]) return [];
    const out = [];
    sr.values[column].forEach((v, k) => { if (isNum(v)) out.push([sr.step[k], v]); });
    return out;
  }

  function drawLegend() {
    fill(legend, ids.map((id, i) => h('span', { 'data-run': id }, h('span', { class: 'sw', style: { background: colorOf(i) } }),
      h('a', { href: `#/runs/${encodeURIComponent(id)}`, title: id }, name(i)))));
  }

  function drawLoss() {
    const series = [];
    ids.forEach((id, i) => {
      const raw = points(i, 'loss');
      if (st.smoothing > 0) series.push({ label: `${name(i)} (raw)`, color: colorOf(i), points: raw, faint: true });
      series.push({ label: name(i), color: colorOf(i), points: ema(raw, st.smoothing) });
    });
    fill(lossHolder, lineChart(series, { height: 300, xLabel: 'optimizer step', title: 'loss overlay', integerX: true }));
  }

  function drawSmall() {
    const small = (title, column, fmt, extra) => h('section', { class: 'card' }, h('h3', {}, title),
      lineChart(ids.map((id, i) => Object.assign({ label: name(i), color: colorOf(i), points: points(i, column) }, extra || {})),
        { height: 170, yFormat: fmt, integerX: true, title: `${column} overlay` }));
    fill(smallHolder,
      small('validation loss', 'val_loss', undefined, { dots: true }),
      small('learning rate', 'learning_rate', (v) => (v === 0 ? '0' : v.toExponential(1).replace('e+', 'e'))),
      small('tokens/s', 'tokens_per_sec', (v) => fmtSI(v)));
  }

  function drawSummary() {
    const runs = st.comparison.runs;
    const best = (r, k) => (r.best && r.best[k] ? `${fmtNum(r.best[k].value)} @${fmtInt(r.best[k].step)}` : '–');
    const fin = (r, k) => (r.final && isNum(r.final[k]) ? fmtNum(r.final[k]) : '–');
    const rows = [
      ['status', (r) => badge(r.status)],
      ['steps', (r) => `${r.final ? fmtInt(r.final.step) : 0} / ${isNum(r.steps_total) ? fmtInt(r.steps_total) : '?'}`],
      ['final loss', (r) => fin(r, 'loss')],
      ['best loss', (r) => best(r, 'loss')],
      ['final val_loss', (r) => fin(r, 'val_loss')],
      ['best val_loss', (r) => best(r, 'val_loss')],
      ['final tokens/s', (r) => (r.final && isNum(r.final.tokens_per_sec) ? fmtInt(r.final.tokens_per_sec) : '–')],
      ['tags', (r) => tagChips(r.tags)],
    ];
    fill(summary, h('table', { class: 'compare-summary' },
      h('thead', {}, h('tr', {}, h('th', {}, ''), runs.map((r, i) => h('th', { class: 'num' }, h('span', { class: 'sw', style: { background: colorOf(i) } }), r.name)))),
      h('tbody', {}, rows.map(([label, cell]) => h('tr', { 'data-row': label }, h('th', {}, label), runs.map((r) => h('td', { class: 'num' }, cell(r))))))));
  }

  function drawDiffs() {
    const c = st.comparison;
    const show = (v) => (v === null || v === undefined ? '–' : typeof v === 'string' ? v : JSON.stringify(v));
    fill(diffs,
      c.differences.length
        ? h('table', { class: 'compare-diffs' },
          h('thead', {}, h('tr', {}, h('th', {}, 'key'), c.runs.map((r, i) => h('th', {}, h('span', { class: 'sw', style: { background: colorOf(i) } }), r.name)))),
          h('tbody', {}, c.differences.map((d) => h('tr', { 'data-key': d.key }, h('td', { class: 'mono' }, d.key),
            d.values.map((v) => h('td', { class: 'mono', title: show(v) }, show(v)))))))
        : h('p', { class: 'muted' }, 'The resolved configs are the same.'),
      c.left_out && c.left_out.length ? h('p', { class: 'muted small' }, `Differ by construction, not shown: ${c.left_out.join(', ')}`) : null);
  }

  return {
    async refresh() {
      if (ids.length < 2) {
        errorBox.hidden = false;
        errorBox.textContent = 'Select at least two runs to compare (the checkboxes of the runs list).';
        return 3600 * 1000;
      }
      try {
        const [comparison, page] = await Promise.all([compareRuns(ids), compareMetrics(ids, COLUMNS, POINTS)]);
        if (!alive()) return POLL_LIVE_MS;
        st.comparison = comparison;
        // series come in the order asked; matched by id all the same
        const byId = new Map(page.series.map((sr) => [String(sr.run_id).toLowerCase(), sr]));
        st.series = ids.map((id) => byId.get(id.toLowerCase()) || null);
        errorBox.hidden = true;
      } catch (e) {
        errorBox.hidden = false;
        errorBox.textContent = `Could not compare these runs: ${e.message}`;
        return POLL_IDLE_MS;
      }
      document.title = `compare ${ids.length} runs · moejobs`;
      drawLegend(); drawLoss(); drawSmall(); drawSummary(); drawDiffs();
      const live = st.comparison.runs.some((r) => !TERMINAL.has(r.status));
      return live ? POLL_LIVE_MS * 2 : POLL_IDLE_MS * 4;
    },
  };
}
