/* A run's tags and note on its page: shown, and changed through PATCH /runs/{id} (add_tags and
 * remove_tags change the list on the server, so two browsers' edits both count; note: text, or
 * null to clear). A refused change (422) is shown under its field. The sweep a run belongs to is
 * linked here too. */
import { patchRun } from '../api.js';
import { fill, h, toast } from '../util.js';

export function tagsCard(runId, onchange) {
  const list = h('span', { class: 'tags', id: 'run-tags' });
  const input = h('input', {
    type: 'text', id: 'tag-input', placeholder: 'add tags (space or comma between)', maxlength: 400, spellcheck: 'false',
    onkeydown: (ev) => { if (ev.key === 'Enter') { ev.preventDefault(); addTags(); } },
  });
  const addBtn = h('button', { class: 'btn btn-small', type: 'button', 'data-action': 'add-tags', onclick: addTags }, 'Add');
  const tagErrors = h('ul', { class: 'field-errors', 'data-errors-for': 'tags' });
  const note = h('textarea', { id: 'note-input', rows: 2, maxlength: 10000, placeholder: 'a note about this run', oninput: () => { dirty = true; saveBtn.disabled = false; } });
  const saveBtn = h('button', { class: 'btn btn-small', type: 'button', 'data-action': 'save-note', disabled: true, onclick: saveNote }, 'Save note');
  const noteErrors = h('ul', { class: 'field-errors', 'data-errors-for': 'note' });
  const sweep = h('div', { class: 'small muted', hidden: true });
  let dirty = false;
  let run = null;

  const el = h('section', { class: 'card tags-card' },
    h('div', { class: 'tags-row' }, h('b', {}, 'Tags'), list, input, addBtn), tagErrors,
    h('div', { class: 'note-row' }, h('b', {}, 'Note'), note, saveBtn), noteErrors, sweep);

  function errorsOf(e, field) {
    const errs = e.body && Array.isArray(e.body.errors) ? e.body.errors : [{ loc: ['body', field], msg: e.message }];
    return errs.map((x) => h('li', { 'data-loc': (x.loc || []).filter((p) => p !== 'body').join('.') }, x.msg || e.message));
  }

  async function change(body, errorsEl, field) {
    try {
      const updated = await patchRun(runId, body);
      fill(errorsEl);
      show(updated, true);
      onchange(updated);
      return true;
    } catch (e) {
      fill(errorsEl, errorsOf(e, field));
      toast(`Not saved: ${e.message}`, 'bad');
      return false;
    }
  }

  async function addTags() {
    const tags = input.value.split(/[\s,]+/).filter(Boolean);
    if (!tags.length) return;
    addBtn.disabled = true;
    if (await change({ add_tags: tags }, tagErrors, 'add_tags')) input.value = '';
    addBtn.disabled = false;
  }

  async function saveNote() {
    saveBtn.disabled = true;
    const text = note.value.trim() ? note.value : null;
    if (await change({ note: text }, noteErrors, 'note')) { dirty = false; toast('Note saved.', 'ok'); } else saveBtn.disabled = false;
  }

  /** Show a run's tags and note (RunPublic); the note field is left alone while being edited. */
  function show(r, force = false) {
    run = r;
    fill(list, (run.tags || []).length
      ? run.tags.map((t) => h('span', { class: 'tag', 'data-tag': t }, t,
        h('button', { class: 'tag-x', type: 'button', title: `remove tag ${t}`, 'aria-label': `remove tag ${t}`, 'data-remove-tag': t, onclick: () => change({ remove_tags: [t] }, tagErrors, 'remove_tags') }, '×')))
      : h('span', { class: 'muted small' }, 'none'));
    if (force || (!dirty && document.activeElement !== note)) {
      note.value = run.note || '';
      dirty = false;
      saveBtn.disabled = true;
    }
    sweep.hidden = !run.sweep_id;
    if (run.sweep_id) {
      const params = Object.entries(run.sweep_params || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(', ');
      fill(sweep, 'Trial of ', h('a', { href: `#/sweeps/${encodeURIComponent(run.sweep_id)}` }, 'sweep ' + String(run.sweep_id).slice(0, 8)),
        params ? `: ${params}` : '');
    }
  }

  return { el, show };
}
