/* The runs list (#/), with the workers and smoke-test panels. Filters by status, name and tags
 * (GET /runs?status=&name=&tag=...: the API filters); checkboxes select runs for the compare
 * page (#/compare?runs=A,B, 2 to 20 runs). */
import { filterRuns } from '../api.js';
import { refreshNow } from '../router.js';
import { badge, fill, fmtInt, fmtNum, h, isNum, latestMetric, POLL_LIVE_MS, progressEl, shortId, STATUSES, stepsTotal, tagChips, timeEl, toast } from '../util.js';
import { smokePanel } from './smoke.js';
import { workersPanel } from './workers.js';

export function runsView(root, alive) {
  const state = { status: '', name: '', tags: [], items: [], cursor: null, extra: [], loadedMore: false, selected: new Set() };
  const COLS = 9;
  const MAX_COMPARE = 20;
  const filters = () => ({ status: state.status, name: state.name, tags: state.tags, limit: 50 });
  const reload = () => {
    state.extra = []; state.loadedMore = false;
    fill(tbody, h('tr', {}, h('td', { colspan: COLS, class: 'empty' }, 'Loading…')));
    refreshNow();
  };
  let typing = null;
  const nameInput = h('input', {
    type: 'text', id: 'filter-name', placeholder: 'name contains', spellcheck: 'false', 'aria-label': 'filter by name',
    oninput: () => { clearTimeout(typing); typing = setTimeout(() => { state.name = nameInput.value.trim(); reload(); }, 300); },
  });
  const tagInput = h('input', {
    type: 'text', id: 'filter-tag', placeholder: 'tags (all of)', spellcheck: 'false', 'aria-label': 'filter by tags',
    oninput: () => { clearTimeout(typing); typing = setTimeout(() => { state.tags = tagInput.value.split(/[\s,]+/).filter(Boolean); reload(); }, 300); },
  });
  const pickTag = (t) => {
    if (state.tags.includes(t)) return;
    state.tags = [...state.tags, t];
    tagInput.value = state.tags.join(' ');
    reload();
  };
  const compareBtn = h('button', { class: 'btn btn-primary btn-small', type: 'button', 'data-action': 'compare', disabled: true, onclick: openCompare }, 'Compare');
  const clearSel = h('button', { class: 'btn btn-ghost btn-small', type: 'button', hidden: true, onclick: () => { state.selected.clear(); syncSelection(); } }, 'Clear selection');
  function syncSelection() {
    const n = state.selected.size;
    compareBtn.disabled = n < 2 || n > MAX_COMPARE;
    compareBtn.textContent = n ? `Compare (${n})` : 'Compare';
    compareBtn.title = n < 2 ? 'select 2 to 20 runs' : n > MAX_COMPARE ? `at most ${MAX_COMPARE} runs` : 'overlay the selected runs';
    clearSel.hidden = !n;
    for (const box of tbody.querySelectorAll('input[data-select]')) box.checked = state.selected.has(box.dataset.select);
  }
  function openCompare() {
    if (state.selected.size < 2) return;
    location.hash = `#/compare?runs=${[...state.selected].map(encodeURIComponent).join(',')}`;
  }
  const tbody = h('tbody');
  const chips = h('div', { class: 'chips' });
  const more = h('button', { class: 'btn btn-small', type: 'button', hidden: true, onclick: loadMore }, 'Load more');
  const updated = h('span', { class: 'muted small' });
  const errorBox = h('div', { class: 'alert bad', hidden: true });
  for (const st of ['', ...STATUSES]) {
    chips.append(h('button', {
      class: 'chip' + (st === '' ? ' active' : ''), type: 'button', 'data-status': st,
      onclick: () => {
        state.status = st;
        for (const c of chips.children) c.classList.toggle('active', c.dataset.status === st);
        reload();
      },
    }, st || 'all'));
  }
  const workersCard = h('section', { class: 'card' });
  const smokeCard = h('section', { class: 'card' });
  root.append(
    h('div', { class: 'page-head' }, h('h1', {}, 'Runs'), chips, h('span', { class: 'spacer' }), updated),
    h('div', { class: 'filters' }, nameInput, tagInput, h('span', { class: 'spacer' }), clearSel, compareBtn),
    errorBox,
    h('div', { class: 'grid-main' },
      h('section', { class: 'card' },
        h('div', { class: 'table-wrap' },
          h('table', { class: 'runs' },
            h('thead', {}, h('tr', {},
              h('th', { class: 'select' }, ''), h('th', {}, 'Status'), h('th', {}, 'Name'), h('th', {}, 'Tags'), h('th', {}, 'Created'), h('th', {}, 'Steps'),
              h('th', { class: 'num' }, 'Loss'), h('th', { class: 'num' }, 'Tokens/s'), h('th', {}, 'ID'))),
            tbody)),
        h('div', { style: { textAlign: 'center', marginTop: '10px' } }, more)),
      h('div', { class: 'stack' }, workersCard, smokeCard)));
  tbody.append(h('tr', {}, h('td', { colspan: COLS, class: 'empty' }, 'Loading…')));
  const workers = workersPanel(workersCard, alive, true);
  const smoke = smokePanel(smokeCard, alive, true);

  async function loadMore() {
    if (!state.cursor) return;
    more.disabled = true;
    try {
      const page = await filterRuns(Object.assign(filters(), { cursor: state.cursor }));
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
      const filtered = state.status || state.name || state.tags.length;
      fill(tbody, h('tr', {}, h('td', { colspan: COLS, class: 'empty' },
        filtered ? 'No run matches these filters.' : ['No runs yet. ', h('a', { href: '#/new' }, 'Start a new run'), ' from a preset or your own configs.'])));
      return;
    }
    fill(tbody, ...runs.map((run, i) => {
      const row = latest[i];
      const href = `#/runs/${encodeURIComponent(run.id)}`;
      const id = String(run.id);
      const box = h('input', {
        type: 'checkbox', 'data-select': id, 'aria-label': `select ${run.name}`, checked: state.selected.has(id) || undefined,
        onchange: (ev) => { if (ev.target.checked) state.selected.add(id); else state.selected.delete(id); syncSelection(); },
      });
      return h('tr', { class: 'clickable', 'data-run-id': id, onclick: (ev) => { if (!ev.target.closest('a, button, input, td.select')) location.hash = href; } },
        h('td', { class: 'select' }, box),
        h('td', {}, badge(run.status)),
        h('td', { class: 'name', title: run.name }, h('a', { href }, run.name || shortId(run.id))),
        h('td', { class: 'tags-cell' }, tagChips(run.tags, pickTag)),
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
        const page = await filterRuns(filters());
        if (!alive()) return POLL_LIVE_MS;
        state.items = page.items;
        if (!state.loadedMore) state.cursor = page.next_cursor || null;
        errorBox.hidden = true;
        await render();
        syncSelection();
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
