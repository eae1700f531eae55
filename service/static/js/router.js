/* The router: hash routes to views, one view at a time; a view's poll loop stops when the route
 * changes. A view is render(root, alive, match) -> {refresh(): Promise<next poll delay in ms>}. */
import { ApiError } from './api.js';
import { fill, POLL_IDLE_MS } from './util.js';

let generation = 0;
let currentRefresh = null;
let pollTimer = null;
let table = [];

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

/** Poll the current view now (after an action changed what it shows). */
export function refreshNow() { if (currentRefresh) currentRefresh(); }

function route() {
  document.title = 'moejobs';
  const hash = location.hash || '#/';
  const entry = table.find((r) => r.pattern.test(hash)) || table[table.length - 1];
  const match = hash.match(entry.pattern);
  startView((el, alive) => entry.view(el, alive, match));
  for (const a of document.querySelectorAll('[data-nav]')) a.classList.toggle('active', a.dataset.nav === entry.nav);
}

/** Start routing. routes: [{pattern: RegExp on location.hash, nav: the data-nav link to mark,
 *  view}], the first match wins; the last is the fallback. */
export function startRouter(routes) {
  table = routes;
  document.addEventListener('visibilitychange', () => { if (!document.hidden) refreshNow(); });
  window.addEventListener('hashchange', route);
  route();
}
