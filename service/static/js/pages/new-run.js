/* The run editor (#/new; #/new?clone=<id> starts from a run's resolved configs).
 *
 * The two documents are edited as text, YAML or JSON (the server parses both: they travel as the
 * two files of a multipart POST /runs, the form the command line's files take). Every change is
 * checked by POST /runs/validate (debounced): errors are shown under the document and key they
 * name (errors[].loc: ["body", "train_config", "train", "micro_batch_size"]), with the line when
 * the key can be found in the text; warnings and the estimate likewise. Submitting goes to the
 * new run's page. */
import { getRun, listPresets, runConfigYaml, submitRun, validateRun } from '../api.js';
import { fill, fmtBytes, fmtDuration, fmtInt, fmtSI, h, isNum, toast } from '../util.js';

const VALIDATE_DELAY_MS = 500;
const DOCS = [
  { key: 'train_config', title: 'Train config', hint: 'train_config.yaml: LitGPT pretrain options (train, eval, optimizer, data, tokenizer_dir…)' },
  { key: 'model_config', title: 'Model config', hint: 'model_config.yaml: the litgpt.Config of the model (name, n_layer, n_expert…)' },
];

// ---------------------------------------------------------------------------------------------
// YAML text without a YAML library: emit plain JSON data, cut the API's two-document YAML.

const PLAIN = /^[A-Za-z_./][A-Za-z0-9_./-]*$/;
const RESERVED = /^(?:true|false|yes|no|on|off|null|y|n|~)$/i;

function yamlScalar(v) {
  if (v === null || v === undefined) return 'null';
  if (typeof v === 'string') return PLAIN.test(v) && !RESERVED.test(v) ? v : JSON.stringify(v);
  // YAML 1.1 (PyYAML) reads 1e-7 as a string: a float's exponent needs a dot before it
  if (typeof v === 'number') return String(v).replace(/^(-?\d+)e/, '$1.0e');
  return String(v);
}

/** JSON data (mappings, lists, strings, numbers, booleans, null) as block YAML. */
export function toYaml(value, indent = '') {
  if (Array.isArray(value)) {
    if (!value.length) return '[]';
    return value.map((item) => {
      const inner = toYaml(item, indent + '  ');
      return `${indent}- ${typeof item === 'object' && item !== null && !isEmpty(item) ? inner.trimStart() : inner}`;
    }).join('\n');
  }
  if (value && typeof value === 'object') {
    const keys = Object.keys(value);
    if (!keys.length) return '{}';
    return keys.map((k) => {
      const v = value[k];
      const key = `${indent}${yamlScalar(k)}:`;
      if (v && typeof v === 'object' && !isEmpty(v)) return `${key}\n${toYaml(v, indent + '  ')}`;
      return `${key} ${toYaml(v, indent + '  ')}`;
    }).join('\n');
  }
  return yamlScalar(value);
}
function isEmpty(v) { return Array.isArray(v) ? !v.length : !Object.keys(v).length; }

/** GET /runs/{id}/config's YAML ({train_config: ..., model_config: ...}, PyYAML's block style)
 *  cut into the two documents: each top-level key's block, one indentation level removed. */
export function splitDocuments(text) {
  const out = {};
  let current = null;
  for (const line of text.split('\n')) {
    const top = line.match(/^([A-Za-z_][\w-]*):(.*)$/);
    if (top) {
      current = top[1];
      out[current] = [];
      const rest = top[2].trim();
      if (rest) out[current].push(rest);
      continue;
    }
    if (current) out[current].push(line.startsWith('  ') ? line.slice(2) : line);
  }
  const docs = {};
  for (const [k, lines] of Object.entries(out)) docs[k] = lines.join('\n').replace(/\s+$/, '') + '\n';
  return docs;
}

/** The 0-based line of a key path (["train", "micro_batch_size"]) in a YAML or JSON text, or of
 *  its deepest parent found; null when not even the first key is there. */
export function lineOf(text, path) {
  const lines = text.split('\n');
  let from = 0;
  let indent = -1;
  let found = null;
  for (const part of path) {
    if (typeof part === 'number') continue;
    const esc = String(part).replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
    const re = new RegExp(`^(\\s*)(?:- )?["']?${esc}["']?\\s*:`);
    let hit = null;
    for (let i = from; i < lines.length; i++) {
      const m = lines[i].match(re);
      if (m && m[1].length > indent) { hit = { line: i, indent: m[1].length }; break; }
      // a line at the parent's indentation or less (a list item counts one level deeper) ends
      // the parent's block
      const lead = lines[i].match(/^(\s*)(\S)/);
      if (indent >= 0 && lead && lead[2] !== '#' && lead[1].length + (lead[2] === '-' ? 2 : 0) <= indent) break;
    }
    if (!hit) break;
    found = hit.line; from = hit.line + 1; indent = hit.indent;
  }
  return found;
}

function locText(loc) {
  return loc.map((p) => (typeof p === 'number' ? `[${p}]` : p)).join('.').replace(/\.\[/g, '[');
}

// ---------------------------------------------------------------------------------------------

export function newRunView(root, alive, cloneId) {
  const nameInput = h('input', { id: 'run-name', type: 'text', placeholder: 'my-run', maxlength: 200, spellcheck: 'false', oninput: changed });
  const presetSelect = h('select', { id: 'run-preset', onchange: changed }, h('option', { value: '' }, 'none'));
  const presetLoad = h('button', { class: 'btn btn-small', type: 'button', onclick: loadPreset, 'data-action': 'load-preset', disabled: true }, 'Start from this preset');
  const nameErrors = h('ul', { class: 'field-errors', 'data-errors-for': 'name' });
  const generalErrors = h('ul', { class: 'field-errors', 'data-errors-for': 'body' });
  const status = h('span', { class: 'muted small', id: 'validate-status' }, '');
  const submitBtn = h('button', { class: 'btn btn-primary', type: 'button', onclick: submit, 'data-action': 'submit', disabled: true }, 'Submit run');
  const estimateBody = h('div', { id: 'editor-estimate' }, h('p', { class: 'muted' }, 'The estimate appears when both documents are valid.'));
  const warningsList = h('ul', { class: 'field-errors', 'data-warnings': '' });
  const editors = {};
  let presets = [];
  let timer = null;
  let seq = 0;
  let lastValid = false;
  let submitting = false;
  let idempotencyKey = newKey();

  const cards = DOCS.map((d) => {
    const area = h('textarea', {
      id: `doc-${d.key}`, 'data-doc': d.key, spellcheck: 'false', autocomplete: 'off',
      placeholder: `YAML or JSON\n${d.hint}`, oninput: changed,
    });
    const errors = h('ul', { class: 'field-errors', 'data-errors-for': d.key });
    const upload = h('input', {
      type: 'file', accept: '.yaml,.yml,.json,application/json,application/yaml,text/yaml',
      'aria-label': `upload ${d.title}`,
      onchange: async (ev) => {
        const file = ev.target.files && ev.target.files[0];
        if (!file) return;
        area.value = await file.text();
        changed();
      },
    });
    editors[d.key] = { area, errors };
    return h('section', { class: 'card doc-editor' },
      h('div', { class: 'card-head' }, h('h2', {}, d.title), h('span', { class: 'spacer' }), upload),
      area, errors);
  });

  root.append(
    h('div', { class: 'page-head' }, h('a', { href: '#/', class: 'small' }, '← Runs'), h('h1', {}, cloneId ? 'Clone run' : 'New run')),
    h('section', { class: 'card', style: { marginBottom: '16px' } },
      h('div', { class: 'editor-meta' },
        h('label', {}, 'Name', nameInput),
        h('label', {}, 'Preset (merged over the documents)', presetSelect),
        presetLoad),
      nameErrors, generalErrors),
    h('div', { class: 'grid-2' }, cards),
    h('div', { class: 'grid-2', style: { marginTop: '16px' } },
      h('section', { class: 'card' }, h('h2', {}, 'Estimate'), estimateBody),
      h('section', { class: 'card' }, h('h2', {}, 'Warnings'), warningsList)),
    h('div', { class: 'editor-actions' }, submitBtn, status));

  function newKey() {
    return (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(36).slice(2)}`);
  }

  function documents() {
    return {
      name: nameInput.value.trim(),
      preset: presetSelect.value,
      train: editors.train_config.area.value,
      model: editors.model_config.area.value,
    };
  }

  function changed() {
    idempotencyKey = newKey(); // another body: another submission
    presetLoad.disabled = !presetSelect.value;
    clearTimeout(timer);
    timer = setTimeout(validate, VALIDATE_DELAY_MS);
    status.textContent = 'checking…';
  }

  async function validate() {
    const doc = documents();
    const mine = ++seq;
    if (!doc.train.trim() && !doc.model.trim()) {
      status.textContent = ''; showErrors([]); lastValid = false; submitBtn.disabled = true;
      return;
    }
    let report;
    try {
      report = await validateRun(doc);
    } catch (e) {
      if (mine !== seq || !alive()) return;
      // 422: a document that cannot be parsed, or a bad envelope (ErrorBody with errors[])
      const errs = e.body && Array.isArray(e.body.errors) ? e.body.errors : [{ loc: ['body'], msg: e.message }];
      showErrors(errs); showWarnings([]); showEstimate(null);
      lastValid = false; submitBtn.disabled = true; status.textContent = 'invalid';
      return;
    }
    if (mine !== seq || !alive()) return;
    // ValidationReport: {valid, errors: [{loc, msg}], warnings: [{loc, msg}], estimate}
    showErrors(report.errors);
    showWarnings(report.warnings);
    showEstimate(report.valid ? report.estimate : null);
    lastValid = report.valid;
    submitBtn.disabled = !report.valid || submitting;
    status.textContent = report.valid
      ? (report.warnings.length ? `valid, ${report.warnings.length} warning${report.warnings.length === 1 ? '' : 's'}` : 'valid')
      : `${report.errors.length} error${report.errors.length === 1 ? '' : 's'}`;
  }

  /** errs: [{loc, msg}], loc starting with "body" (the API's form) or not (validate's). */
  function showErrors(errs) {
    const groups = { name: [], body: [], train_config: [], model_config: [] };
    for (const err of errs || []) {
      let loc = Array.isArray(err.loc) ? err.loc.slice() : [];
      if (loc[0] === 'body') loc = loc.slice(1);
      const where = loc[0] in editors ? loc[0] : (loc[0] === 'name' || loc[0] === 'preset' ? 'name' : 'body');
      groups[where].push({ loc, path: where in editors ? loc.slice(1) : loc, msg: err.msg || String(err.message || '') });
    }
    fill(nameErrors, groups.name.map((e) => h('li', { 'data-loc': locText(e.loc) }, h('code', {}, locText(e.loc)), `: ${e.msg}`)));
    fill(generalErrors, groups.body.map((e) => h('li', { 'data-loc': locText(e.loc) }, e.loc.length ? [h('code', {}, locText(e.loc)), ': '] : null, e.msg)));
    for (const [key, ed] of Object.entries(editors)) {
      const list = groups[key];
      ed.area.classList.toggle('invalid', list.length > 0);
      fill(ed.errors, list.map((e) => {
        const line = e.path.length ? lineOf(ed.area.value, e.path) : null;
        return h('li', {
          'data-loc': locText(e.path), title: line === null ? '' : 'show the line',
          onclick: () => { if (line !== null) selectLine(ed.area, line); },
        }, h('code', {}, locText(e.path) || key), line === null ? '' : ` (line ${line + 1})`, `: ${e.msg}`);
      }));
    }
  }

  function showWarnings(warnings) {
    fill(warningsList, (warnings || []).length
      ? warnings.map((w) => h('li', { class: 'warning', 'data-loc': locText(w.loc) }, h('code', {}, locText(w.loc.filter((p) => p !== 'body'))), `: ${w.msg}`))
      : h('li', { class: 'warning muted' }, 'None.'));
  }

  function showEstimate(est) {
    if (!est) { fill(estimateBody, h('p', { class: 'muted' }, 'The estimate appears when both documents are valid.')); return; }
    const plan = est.plan || {}; const params = est.params || {}; const mem = est.memory || {};
    const times = est.time_s && typeof est.time_s === 'object' ? Object.entries(est.time_s) : [];
    const rows = [
      ['Parameters', isNum(params.total) ? `${fmtSI(params.total)} total, ${fmtSI(params.active)} active per token` : null],
      ['Optimizer steps', isNum(plan.optimizer_steps) ? `${fmtInt(plan.optimizer_steps)} × ${fmtSI(plan.tokens_per_step)} tokens` : null],
      ['Tokens trained', isNum(plan.tokens_trained) ? fmtSI(plan.tokens_trained) : null],
      ['Memory / rank', isNum(mem.total) ? fmtBytes(mem.total) : null],
      ['Checkpoint', isNum(est.checkpoint_bytes) ? `${fmtBytes(est.checkpoint_bytes)} weights` : null],
      ['Time', times.length ? times.map(([gpu, sec]) => `${gpu} ${fmtDuration(sec)}`).join(' · ') : null],
    ].filter(([, v]) => v);
    fill(estimateBody, h('dl', { class: 'kv' }, rows.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])));
  }

  function selectLine(area, line) {
    const lines = area.value.split('\n');
    const start = lines.slice(0, line).reduce((n, l) => n + l.length + 1, 0);
    area.focus();
    area.setSelectionRange(start, start + lines[line].length);
    const lh = parseFloat(getComputedStyle(area).lineHeight) || 18;
    area.scrollTop = Math.max(0, (line - 3) * lh);
  }

  async function submit() {
    if (!lastValid || submitting) return;
    submitting = true; submitBtn.disabled = true; status.textContent = 'submitting…';
    const doc = documents();
    if (!doc.name) doc.name = `run-${new Date().toISOString().slice(0, 19).replace(/[-:T]/g, '')}`;
    try {
      const run = await submitRun(doc, idempotencyKey);
      toast(`Run "${run.name}" submitted.`, 'ok');
      location.hash = `#/runs/${encodeURIComponent(run.id)}`;
    } catch (e) {
      const errs = e.body && Array.isArray(e.body.errors) ? e.body.errors : null;
      if (errs) showErrors(errs);
      toast(`Not submitted: ${e.message}`, 'bad');
      status.textContent = 'not submitted';
      submitting = false; submitBtn.disabled = false;
    }
  }

  function loadPreset() {
    const p = presets.find((x) => x.name === presetSelect.value);
    if (!p) return;
    const filled = editors.train_config.area.value.trim() || editors.model_config.area.value.trim();
    if (filled && !confirm(`Replace both documents with preset "${p.name}"'s?`)) return;
    editors.train_config.area.value = toYaml(p.train_config) + '\n';
    editors.model_config.area.value = toYaml(p.model_config) + '\n';
    if (!nameInput.value) nameInput.value = p.name;
    changed();
  }

  async function start() {
    try {
      presets = await listPresets();
      for (const p of presets) presetSelect.append(h('option', { value: p.name }, p.name));
    } catch (e) { /* the editor works without presets */ }
    if (!cloneId) return;
    try {
      const [run, text] = await Promise.all([getRun(cloneId), runConfigYaml(cloneId)]);
      if (!alive()) return;
      const docs = splitDocuments(typeof text === 'string' ? text : '');
      // out_dir is always the new run's own folder (the old run's is refused): left out
      editors.train_config.area.value = (docs.train_config || '').split('\n').filter((l) => !/^out_dir:/.test(l)).join('\n');
      editors.model_config.area.value = docs.model_config || '';
      nameInput.value = `${run.name}-clone`.slice(0, 200);
      changed();
    } catch (e) {
      fill(generalErrors, h('li', {}, `Could not load run ${cloneId}: ${e.message}`));
    }
  }

  let started = false;
  return {
    async refresh() {
      if (!started) { started = true; await start(); }
      return 3600 * 1000; // nothing to poll: validation follows the edits
    },
  };
}
