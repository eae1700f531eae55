/* moejobs dashboard: vanilla JavaScript in ES modules, no dependencies, no build step.
 *
 * Views (hash routes): #/ runs list (+ workers and smoke test panels), #/runs/<id> one run,
 * #/new the run editor (#/new?clone=<id> prefilled with a run's resolved configs), #/workers,
 * #/smoke-test, #/compare?runs=A,B overlaid runs, #/sweeps the sweeps, #/sweeps/<id> one sweep,
 * #/sweeps/new the sweep editor (#/sweeps/new?from=<run id>: a run's resolved configs as base). Everything is read from the JSON API next to this page (js/api.js) and
 * refreshed by polling; charts are inline SVG drawn by js/charts.js. Loaded as
 * <script type="module"> from this server (the Content-Security-Policy allows nothing else).
 */
import { askToken, onTokenSaved } from './js/api.js';
import { compareView } from './js/pages/compare.js';
import { newSweepView } from './js/pages/new-sweep.js';
import { newRunView } from './js/pages/new-run.js';
import { runView } from './js/pages/run.js';
import { runsView } from './js/pages/runs.js';
import { smokeView } from './js/pages/smoke.js';
import { sweepsView, sweepView } from './js/pages/sweeps.js';
import { workersView } from './js/pages/workers.js';
import { refreshNow, startRouter } from './js/router.js';

onTokenSaved(refreshNow);
document.getElementById('token-button').addEventListener('click', () => {
  askToken('', true).then((ok) => { if (ok) refreshNow(); });
});

startRouter([
  { pattern: /^#\/new(?:\?clone=([^&#]+))?/, nav: 'new', view: (el, alive, m) => newRunView(el, alive, m[1] ? decodeURIComponent(m[1]) : null) },
  { pattern: /^#\/runs\/([^/?#]+)/, nav: 'runs', view: (el, alive, m) => runView(el, alive, decodeURIComponent(m[1])) },
  { pattern: /^#\/compare(?:\?runs=([^&#]*))?/, nav: 'runs', view: (el, alive, m) => compareView(el, alive, (m[1] ? decodeURIComponent(m[1]) : '').split(',').filter(Boolean)) },
  { pattern: /^#\/sweeps\/new(?:\?from=([^&#]+))?/, nav: 'sweeps', view: (el, alive, m) => newSweepView(el, alive, m[1] ? decodeURIComponent(m[1]) : null) },
  { pattern: /^#\/sweeps\/([^/?#]+)/, nav: 'sweeps', view: (el, alive, m) => sweepView(el, alive, decodeURIComponent(m[1])) },
  { pattern: /^#\/sweeps/, nav: 'sweeps', view: sweepsView },
  { pattern: /^#\/workers/, nav: 'workers', view: workersView },
  { pattern: /^#\/smoke-test/, nav: 'smoke', view: smokeView },
  { pattern: /^/, nav: 'runs', view: runsView },
]);
