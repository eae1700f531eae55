/* One run (#/runs/<id>): tiles, loss and other curves, router shares, checkpoints, events,
 * estimate, log, resolved configuration. */
import { api, API_BASE, deleteRun, downloadWithToken, patchRun, runMetricsCsv, saveBlob } from '../api.js';
import { ema, lineChart, stackedChart } from '../charts.js';
import { refreshNow } from '../router.js';
import { badge, fill, fmtAgo, fmtBytes, fmtDuration, fmtInt, fmtNum, fmtSI, fmtTime, h, isNum, issueText, LOG_TAIL, PALETTE, parseTime, POLL_IDLE_MS, POLL_LIVE_MS, progressEl, savedSmoothing, shortId, smoothingControl, stepsTotal, TERMINAL, timeEl, toast } from '../util.js';
import { tagsCard } from './tags.js';

const CSV_PAGE = 100000;

export function runView(root, alive, runId) {
  const base = `/runs/${encodeURIComponent(runId)}`;
  const st = {
    run: null, metrics: [], lastStep: -1, router: [], routerLast: -1, routerMissing: false,
    logScale: (() => { try { return localStorage.getItem('moejobs.logScale') === '1'; } catch (e) { return false; } })(),
    smoothing: savedSmoothing(),
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
  // EMA smoothing of the loss curves (0 = raw, up to 0.99), as W&B's and TensorBoard's slider
  const smoothing = smoothingControl(st.smoothing, (w) => { st.smoothing = w; drawCharts(); });
  const tags = tagsCard(runId, (run) => { st.run = run; });
  const scaleToggle = h('input', {
    type: 'checkbox', checked: st.logScale || undefined,
    onchange: (e) => { st.logScale = e.target.checked; try { localStorage.setItem('moejobs.logScale', st.logScale ? '1' : '0'); } catch (x) { /* ignore */ } drawCharts(); },
  });

  root.append(
    head, failureBox, warnBox, tags.el, tiles,
    h('section', { class: 'card', style: { marginBottom: '16px' } },
      h('div', { class: 'card-head' }, h('h2', {}, 'Loss'), h('span', { class: 'spacer' }),
        smoothing,
        h('button', { class: 'btn btn-small btn-ghost', type: 'button', onclick: exportCsv, 'data-action': 'export-csv' }, 'Export CSV'),
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
      h('span', { class: 'spacer' }),
      h('a', { class: 'btn', href: `#/new?clone=${encodeURIComponent(run.id)}`, 'data-action': 'clone', title: 'open the run editor with this run\'s resolved configs' }, 'Clone'),
      h('a', { class: 'btn', href: `#/sweeps/new?from=${encodeURIComponent(run.id)}`, 'data-action': 'sweep-from', title: 'open the sweep editor with this run\'s resolved configs as its base' }, 'Sweep from this'),
      cancelBtn,
      live ? null : h('button', { class: 'btn btn-danger', type: 'button', 'data-action': 'delete', onclick: deleteThisRun }, 'Delete'));

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
        h('div', { class: 'value', title: `${fmtInt(done)} / ${total ? fmtInt(total) : '?'} steps` }, `${fmtInt(done)} / ${total ? fmtInt(total) : '?'}`),
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

  async function deleteThisRun(ev) {
    const run = st.run;
    if (!confirm(`Delete run "${run.name}"? Its rows, metrics, checkpoints and files are removed; this cannot be undone.`)) return;
    ev.target.disabled = true;
    try {
      await deleteRun(runId);
      toast(`Run "${run.name}" deleted.`, 'ok');
      location.hash = '#/';
    } catch (e) { toast(`Delete failed: ${e.message}`, 'bad'); ev.target.disabled = false; }
  }

  /** Every metric row as metrics.csv (GET /runs/{id}/metrics?format=csv, pages of 100,000 rows
   *  joined under one header), saved as <name>-metrics.csv. */
  async function exportCsv(ev) {
    ev.target.disabled = true;
    try {
      let text = '';
      let after = null;
      for (let page = 0; page < 100; page++) {
        const part = await runMetricsCsv(runId, { after_step: after, limit: CSV_PAGE });
        const lines = part.split(/\r?\n/).filter((l) => l.length);
        if (!text) text = lines[0] + '\n';
        const rows = lines.slice(1);
        if (rows.length) text += rows.join('\n') + '\n';
        if (rows.length < CSV_PAGE) break;
        after = Number(rows[rows.length - 1].split(',')[0]);
      }
      saveBlob(new Blob([text], { type: 'text/csv' }), `${(st.run && st.run.name) || shortId(runId)}-metrics.csv`);
    } catch (e) { toast(`Export failed: ${e.message}`, 'bad'); } finally { ev.target.disabled = false; }
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
        st.smoothing > 0 ? { label: 'loss (raw)', color: PALETTE[0], points: loss, faint: true } : null,
        { label: st.smoothing > 0 ? 'loss (smoothed)' : 'loss', color: PALETTE[0], points: ema(loss, st.smoothing) },
        // validation points are few and already averages: drawn as they are
        { label: 'val_loss', color: PALETTE[1], points: val, dots: true, width: 2 },
      ].filter(Boolean), { height: 280, logY: st.logScale, xLabel: 'optimizer step', title: 'loss vs step', integerX: true }));
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
    // CheckpointPublic (service/api/models.py): {name, step, path, size_bytes, created_at, archive_url, samples}
    const link = (c, query, suffix, label) => {
      const path = c.archive_url + (query ? `?${query}` : '');
      const file = `${shortId(runId)}-${c.name}${suffix}.tar`;
      return h('a', { href: API_BASE + path, download: file, onclick: (ev) => downloadWithToken(ev, path, file) }, label);
    };
    const withSamples = list.filter((c) => Array.isArray(c.samples) && c.samples.length);
    fill(ckptBody, h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, 'Checkpoint'), h('th', { class: 'num' }, 'Step'), h('th', { class: 'num' }, 'Size'), h('th', {}, 'Written'), h('th', {}, 'Download'))),
      h('tbody', {}, list.map((c) => h('tr', {},
        h('td', { class: 'mono' }, c.name),
        h('td', { class: 'num' }, isNum(c.step) ? fmtInt(c.step) : '–'),
        h('td', { class: 'num' }, fmtBytes(c.size_bytes)),
        h('td', {}, timeEl(c.created_at)),
        h('td', {},
          link(c, '', '', 'all .tar'), ' · ',
          link(c, 'include=weights', '-weights', 'weights only'), ' · ',
          link(c, 'format=safetensors', '-safetensors', 'safetensors'))))))),
    withSamples.length ? renderSamples(withSamples) : null);
  }

  // Greedy continuations of the same prompts by each checkpoint (worker/sample.py): one row per
  // prompt, one column per checkpoint, so the text can be read as the training went on.
  function renderSamples(list) {
    const prompts = list[0].samples.map((s) => s.prompt);
    return h('div', { class: 'table-wrap samples' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, 'Prompt'), list.map((c) => h('th', { class: 'mono' }, c.name)))),
      h('tbody', {}, prompts.map((prompt, i) => h('tr', {},
        h('td', { class: 'mono' }, prompt),
        list.map((c) => {
          const s = c.samples[i];
          return h('td', { class: 'sample' }, s && s.prompt === prompt ? h('span', {}, h('b', {}, prompt), s.text) : '–');
        }))))));
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
      if (wasTerminal && st.finalFetched) { renderHead(); tags.show(run); return POLL_IDLE_MS * 4; }
      renderHead();
      tags.show(run);
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
