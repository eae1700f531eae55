/* The runs list (#/), with the workers and smoke-test panels. */
import { api } from '../api.js';
import { refreshNow } from '../router.js';
import { badge, fill, fmtInt, fmtNum, h, isNum, latestMetric, POLL_LIVE_MS, progressEl, query, shortId, STATUSES, stepsTotal, timeEl, toast } from '../util.js';
import { smokePanel } from './smoke.js';
import { workersPanel } from './workers.js';

export function runsView(root, alive) {
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
        state.status ? `No ${state.status} runs.` : ['No runs yet. ', h('a', { href: '#/new' }, 'Start a new run'), ' from a preset or your own configs.'])));
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
