/* The sweep editor (#/sweeps/new; #/sweeps/new?from=<run id> starts from a run's resolved
 * configs as the base). The sweep document is edited as text, YAML or JSON (sent as is: the
 * server parses both). Every change is checked by POST /sweeps/validate (debounced): each error
 * is shown at its field (errors[].loc: ["body", "parameters", "model_config.n_expertz"]) with
 * its line when the key is in the text; the grid's points and the warnings next to it.
 * Submitting (POST /sweeps) opens the new sweep's page. */
import { createSweep, listPresets, runConfigYaml, validateSweep } from '../api.js';
import { fill, h, toast } from '../util.js';
import { lineOf, toYaml } from './new-run.js';

const VALIDATE_DELAY_MS = 500;

/** A sweep document around a base (train and model documents as data): two learning rates. */
function template(name, train, model) {
  return `${toYaml({
    name,
    base: { train_config: train, model_config: model },
    method: 'grid',
    metric: { name: 'loss', goal: 'minimize' },
    parameters: { 'train_config.optimizer.init_args.lr': { values: [0.001, 0.003] } },
    max_concurrent: 2,
    seed: 0,
  })}\n`;
}

/** The same around a run's resolved configs (GET /runs/{id}/config's YAML, the two documents
 *  as top-level keys), indented under base:, without out_dir (each trial gets its own). */
function templateFromRun(name, configYaml) {
  const base = configYaml.split('\n').filter((l) => !/^ {2}out_dir:/.test(l) && l.trim()).map((l) => `  ${l}`).join('\n');
  return `name: ${name}\nbase:\n${base}\nmethod: grid\nmetric:\n  name: loss\n  goal: minimize\n` +
    'parameters:\n  train_config.optimizer.init_args.lr:\n    values: [0.001, 0.003]\nmax_concurrent: 2\nseed: 0\n';
}

function locText(loc) { return loc.map((p) => (typeof p === 'number' ? `[${p}]` : p)).join('.').replace(/\.\[/g, '['); }

export function newSweepView(root, alive, fromRun) {
  const area = h('textarea', {
    id: 'sweep-doc', 'data-doc': 'sweep', spellcheck: 'false', autocomplete: 'off', oninput: changed,
    placeholder: 'YAML or JSON: name, base {train_config, model_config}, method, metric, parameters, max_runs, max_concurrent, early_stopping, seed',
  });
  const errors = h('ul', { class: 'field-errors', 'data-errors-for': 'sweep' });
  const presetSelect = h('select', { id: 'sweep-preset' }, h('option', { value: '' }, 'choose a preset'));
  const presetLoad = h('button', { class: 'btn btn-small', type: 'button', 'data-action': 'load-preset', onclick: loadPreset }, 'Start from this preset');
  const upload = h('input', {
    type: 'file', accept: '.yaml,.yml,.json,application/json,application/yaml,text/yaml', 'aria-label': 'upload a sweep document',
    onchange: async (ev) => { const file = ev.target.files && ev.target.files[0]; if (file) { area.value = await file.text(); changed(); } },
  });
  const status = h('span', { class: 'muted small', id: 'validate-status' }, '');
  const submitBtn = h('button', { class: 'btn btn-primary', type: 'button', 'data-action': 'submit', disabled: true, onclick: submit }, 'Create sweep');
  const pointsBody = h('div', { id: 'sweep-points' }, h('p', { class: 'muted' }, 'A grid\'s trials appear here once the document is valid.'));
  const warningsList = h('ul', { class: 'field-errors', 'data-warnings': '' });
  let presets = [];
  let timer = null;
  let seq = 0;
  let lastValid = false;
  let submitting = false;

  root.append(
    h('div', { class: 'page-head' }, h('a', { href: '#/sweeps', class: 'small' }, '← Sweeps'), h('h1', {}, 'New sweep')),
    h('div', { class: 'grid-2' },
      h('section', { class: 'card doc-editor' },
        h('div', { class: 'card-head' }, h('h2', {}, 'Sweep document'), h('span', { class: 'spacer' }), upload),
        h('div', { class: 'editor-meta' }, presetSelect, presetLoad),
        area, errors),
      h('div', { class: 'stack' },
        h('section', { class: 'card' }, h('h2', {}, 'Trials'), pointsBody),
        h('section', { class: 'card' }, h('h2', {}, 'Warnings'), warningsList),
        h('section', { class: 'card small muted' }, 'Parameters are dotted paths into the two documents; grid takes ',
          h('code', {}, '{values: [...]}'), ', random and tpe also ', h('code', {}, '{min, max, distribution}'),
          ' (log_uniform, uniform, int_uniform) and need max_runs. See the README, "Sweeps".'))),
    h('div', { class: 'editor-actions' }, submitBtn, status));

  function changed() {
    clearTimeout(timer);
    timer = setTimeout(validate, VALIDATE_DELAY_MS);
    status.textContent = 'checking…';
  }

  async function validate() {
    const text = area.value;
    const mine = ++seq;
    if (!text.trim()) { status.textContent = ''; showErrors([]); lastValid = false; submitBtn.disabled = true; return; }
    let report;
    try {
      report = await validateSweep(text);
    } catch (e) {
      if (mine !== seq || !alive()) return;
      // 422: not a sweep document at all (ErrorBody with errors[] naming each field)
      showErrors(e.body && Array.isArray(e.body.errors) ? e.body.errors : [{ loc: ['body'], msg: e.message }]);
      showPoints(null); showWarnings([]);
      lastValid = false; submitBtn.disabled = true; status.textContent = 'invalid';
      return;
    }
    if (mine !== seq || !alive()) return;
    // SweepValidation: {valid, errors: [{loc, msg}], warnings, points}
    showErrors(report.errors); showWarnings(report.warnings); showPoints(report.valid ? report.points : null);
    lastValid = report.valid;
    submitBtn.disabled = !report.valid || submitting;
    status.textContent = report.valid ? 'valid' : `${report.errors.length} error${report.errors.length === 1 ? '' : 's'}`;
  }

  function showErrors(errs) {
    area.classList.toggle('invalid', (errs || []).length > 0);
    fill(errors, (errs || []).map((err) => {
      const loc = (Array.isArray(err.loc) ? err.loc : []).filter((p, i) => !(i === 0 && p === 'body'));
      const line = loc.length ? lineOf(area.value, loc) : null;
      return h('li', {
        'data-loc': locText(loc), title: line === null ? '' : 'show the line',
        onclick: () => { if (line !== null) selectLine(line); },
      }, loc.length ? h('code', {}, locText(loc)) : null, line === null ? '' : ` (line ${line + 1})`, loc.length ? ': ' : '', err.msg || String(err.message || ''));
    }));
  }

  function showWarnings(warnings) {
    fill(warningsList, (warnings || []).length
      ? warnings.map((w) => h('li', { class: 'warning' }, h('code', {}, locText((w.loc || []).filter((p) => p !== 'body'))), `: ${w.msg}`))
      : h('li', { class: 'warning muted' }, 'None.'));
  }

  function showPoints(points) {
    if (!points) { fill(pointsBody, h('p', { class: 'muted' }, 'A grid\'s trials appear here once the document is valid.')); return; }
    if (!points.length) { fill(pointsBody, h('p', { class: 'muted' }, 'Random and TPE sample their points as the sweep goes, up to max_runs.')); return; }
    const keys = Object.keys(points[0]);
    fill(pointsBody, h('p', { class: 'small' }, `${points.length} trial${points.length === 1 ? '' : 's'}:`),
      h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, h('th', { class: 'num' }, '#'), keys.map((k) => h('th', { title: k }, k.split('.').slice(-1)[0])))),
        h('tbody', {}, points.map((p, i) => h('tr', {}, h('td', { class: 'num' }, String(i)), keys.map((k) => h('td', { class: 'mono' }, JSON.stringify(p[k])))))))));
  }

  function selectLine(line) {
    const lines = area.value.split('\n');
    const start = lines.slice(0, line).reduce((n, l) => n + l.length + 1, 0);
    area.focus();
    area.setSelectionRange(start, start + lines[line].length);
  }

  async function submit() {
    if (!lastValid || submitting) return;
    submitting = true; submitBtn.disabled = true; status.textContent = 'creating…';
    try {
      const sweep = await createSweep(area.value);
      toast(`Sweep "${sweep.name}" created with ${sweep.trials.length} trial${sweep.trials.length === 1 ? '' : 's'} so far.`, 'ok');
      location.hash = `#/sweeps/${encodeURIComponent(sweep.id)}`;
    } catch (e) {
      if (e.body && Array.isArray(e.body.errors)) showErrors(e.body.errors);
      toast(`Not created: ${e.message}`, 'bad');
      status.textContent = 'not created';
      submitting = false; submitBtn.disabled = false;
    }
  }

  function loadPreset() {
    const p = presets.find((x) => x.name === presetSelect.value);
    if (!p) return;
    if (area.value.trim() && !confirm(`Replace the document with a sweep over preset "${p.name}"?`)) return;
    area.value = template(`${p.name}-sweep`, p.train_config, p.model_config);
    changed();
  }

  let started = false;
  return {
    async refresh() {
      if (started) return 3600 * 1000;
      started = true;
      try {
        presets = await listPresets();
        for (const p of presets) presetSelect.append(h('option', { value: p.name }, p.name));
      } catch (e) { /* the editor works without presets */ }
      if (fromRun) {
        try {
          const text = await runConfigYaml(fromRun);
          if (!alive()) return 3600 * 1000;
          area.value = templateFromRun(`sweep-${fromRun.slice(0, 8)}`, typeof text === 'string' ? text : '');
          changed();
        } catch (e) { fill(errors, h('li', {}, `Could not load run ${fromRun}: ${e.message}`)); }
      }
      return 3600 * 1000; // nothing to poll: validation follows the edits
    },
  };
}
