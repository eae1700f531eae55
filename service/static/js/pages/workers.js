/* Workers: the page (#/workers) and the panel the runs list shows. */
import { api } from '../api.js';
import { append, badge, fill, fmtBytes, h, isNum, POLL_LIVE_MS, shortId, timeEl } from '../util.js';

export function workersPanel(card, alive, compact) {
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

export function workersView(root, alive) {
  const card = h('section', { class: 'card' });
  root.append(h('div', { class: 'page-head' }, h('h1', {}, 'Workers')), card);
  const panel = workersPanel(card, alive, false);
  return { async refresh() { await panel.refresh(); return POLL_LIVE_MS; } };
}
