// The task list: one row per task, kept across renders and updated in place, with its
// editor, its stuck rows (Retry, Discard) and its conflict view (Keep mine, Take theirs).
// DOM only: what each row shows is the core's item (publish.js), and what a click does
// goes to the sync engine (sync.js) or the likes toggle (likes.js).

import { $, element, setAttr, setText } from './dom.js';
import { resentByItself } from './ops.js';

/**
 * @param {{core: object, sync: object, likeToggle: object}} options
 *   `core`: for the base an editor opens on (`editBase`); `likeToggle`: the browser's like
 *   toggle (`toggle`, `isLiked`)
 * @returns {{render: (items: object[], loaded: boolean) => void, redrawLikes: () => void,
 *   setConnection: (state: string) => void}}
 */
export function createTaskList({ core, sync, likeToggle }) {
  /** An item's toggle: its own ops give the pending deltas (no scan of every op). */
  function drawLike(parts, item) {
    const pending = item.ops.reduce((net, op) => net + (op.kind === 'like' ? op.delta : 0), 0);
    const liked = likeToggle.isLiked(item.id, pending);
    setAttr(parts.likeButton, 'aria-pressed', String(liked));
    setText(parts.likeButton, liked ? '♥ Liked' : '♡ Like');
  }

  const list = $('task-list');
  /** task id -> the parts of its list item, reused across every render. */
  const taskNodes = new Map();
  /**
   * task id -> the open editor's idempotency key (one editing session = one intent), the
   * base it opened on (`core.editBase`: the version and the values the user was shown) and
   * the values it opened with. The edit is made on that base and sets only the fields the
   * user changed from those values, so a change by someone else while the editor was open
   * conflicts (or, to another field, is kept) instead of being overwritten.
   */
  const editors = new Map();
  /** The connection as the core last said (`setConnection`): a stuck row's text says it. */
  let connection = 'connecting';

  /**
   * A click handler that ignores the second click of a double click (`detail` 2 and up; a
   * keyboard activation has 0). One intent per gesture: a toggle double-clicked would undo
   * itself, and after a delete or a save the next row moves up under the pointer.
   */
  function singleClick(handler) {
    return (event) => {
      if (event.detail > 1) {
        event.preventDefault();
        return;
      }
      handler(event);
    };
  }

  function createTaskNode(taskId) {
    const li = element('li', { class: 'task', 'data-testid': 'task', 'data-id': taskId });
    const row = element('div', { class: 'row' });
    const done = element('input', { type: 'checkbox', 'data-testid': 'done', class: 'done' });
    const title = element('span', { class: 'title', 'data-testid': 'title' });
    const marker = element('span', { class: 'marker', 'data-testid': 'pending-marker' });
    const likeButton = element('button', { type: 'button', class: 'like', 'data-testid': 'like', 'aria-pressed': 'false' });
    const likes = element('span', { class: 'likes', 'data-testid': 'likes' });
    const rename = element('button', { type: 'button', class: 'rename', 'data-testid': 'rename' }, 'Rename');
    const remove = element('button', { type: 'button', class: 'delete', 'data-testid': 'delete' }, 'Delete');
    row.append(done, title, marker, likeButton, likes, rename, remove);

    const notes = element('p', { class: 'notes', 'data-testid': 'notes' });
    notes.hidden = true;

    const editor = element('form', { class: 'editor', 'data-testid': 'editor' });
    const titleLabel = element('label', {}, 'Title ');
    const titleInput = element('input', { 'data-testid': 'rename-input', name: 'title', maxlength: '200' });
    titleLabel.append(titleInput);
    const notesLabel = element('label', {}, 'Notes ');
    const notesInput = element('textarea', { 'data-testid': 'notes-input', name: 'notes', rows: '2' });
    notesLabel.append(notesInput);
    const save = element('button', { type: 'submit', 'data-testid': 'save' }, 'Save');
    const cancel = element('button', { type: 'button', 'data-testid': 'cancel' }, 'Cancel');
    editor.append(titleLabel, notesLabel, save, cancel);
    editor.hidden = true;

    const stuck = element('div', { class: 'stuck-list' });
    const conflict = element('div', { class: 'conflict', 'data-testid': 'conflict', role: 'group', 'aria-label': 'Conflict: yours or theirs' });
    conflict.hidden = true;

    li.append(row, notes, editor, stuck, conflict);

    // A checkbox toggles itself before `change`: a cancelled click leaves it as it was.
    done.addEventListener('click', singleClick(() => {}));
    done.addEventListener('change', () => sync.setDone(taskId, done.checked));
    likeButton.addEventListener('click', singleClick(() => likeToggle.toggle(taskId)));
    remove.addEventListener('click', singleClick(() => sync.deleteTask(taskId)));
    rename.addEventListener('click', singleClick(() => openEditor(taskId)));
    cancel.addEventListener('click', () => closeEditor(taskId));
    editor.addEventListener('keydown', (event) => {
      if (event.key === 'Escape') closeEditor(taskId);
    });
    editor.addEventListener('submit', (event) => {
      event.preventDefault();
      submitEditor(taskId);
    });

    const parts = {
      li, done, title, marker, likeButton, likes, rename, remove, notes, editor, titleInput, notesInput,
      stuck, stuckRows: new Map(), conflict, conflictFor: null, item: null,
    };
    taskNodes.set(taskId, parts);
    return parts;
  }

  function openEditor(taskId) {
    const parts = taskNodes.get(taskId);
    const task = parts?.item?.task;
    if (!task) return;
    // Opened again with nothing typed yet: it takes what the task shows now, and its base.
    // Once the user typed, it stays as it is, on the base their typing started from.
    const open = editors.get(taskId);
    const untouched = open && parts.titleInput.value === open.opened.title
      && parts.notesInput.value === open.opened.notes;
    if (!open || untouched) {
      const opened = { title: task.title, notes: task.notes ?? '' };
      editors.set(taskId, { key: open?.key ?? sync.newId(), base: core.editBase(taskId), opened });
      parts.titleInput.value = opened.title;
      parts.notesInput.value = opened.notes;
    }
    parts.editor.hidden = false;
    parts.titleInput.focus();
    parts.titleInput.select();
  }

  function closeEditor(taskId) {
    editors.delete(taskId);
    const parts = taskNodes.get(taskId);
    if (!parts) return;
    parts.editor.hidden = true;
    parts.rename.focus();
  }

  function submitEditor(taskId) {
    const parts = taskNodes.get(taskId);
    const editing = editors.get(taskId);
    if (!parts || !editing || !parts.item) return; // already submitted: a second Enter finds no open editor
    const { opened } = editing;
    const patch = {};
    const title = parts.titleInput.value.trim();
    if (title && title !== opened.title) patch.title = title;
    if (parts.notesInput.value !== opened.notes) patch.notes = parts.notesInput.value;
    if (Object.keys(patch).length) sync.editTask(taskId, patch, editing.key, editing.base);
    closeEditor(taskId);
  }

  function updateTaskNode(parts, item) {
    const { task } = item;
    const stuckOps = item.ops.filter((op) => op.state === 'stuck' || op.overdue);
    const state = item.conflict ? 'conflict' : stuckOps.length ? 'stuck' : item.pending ? 'pending' : 'settled';
    setAttr(parts.li, 'data-pending', String(item.pending));
    setAttr(parts.li, 'data-state', state);
    setAttr(parts.li, 'data-version', String(item.confirmed?.version ?? 0));
    setAttr(parts.li, 'aria-busy', String(item.pending));
    parts.li.classList.toggle('pending', item.pending);
    parts.li.classList.toggle('stuck', stuckOps.length > 0);
    parts.li.classList.toggle('is-done', task.done);
    parts.li.classList.toggle('has-conflict', Boolean(item.conflict));
    parts.li.classList.toggle('deleting', item.deleting);
    setAttr(parts.li, 'data-deleting', String(item.deleting));

    setText(parts.title, task.title);
    if (parts.done.checked !== task.done) parts.done.checked = task.done;
    setAttr(parts.done, 'aria-label', `Done: ${task.title}`);
    setText(parts.likes, String(task.likes));
    drawLike(parts, item);
    setAttr(parts.rename, 'aria-label', `Rename ${task.title}`);
    setAttr(parts.remove, 'aria-label', `Delete ${task.title}`);
    setText(parts.notes, task.notes ?? '');
    parts.notes.hidden = !task.notes;

    // A row being deleted takes no new changes: they would go to a task on its way out.
    for (const control of [parts.done, parts.likeButton, parts.rename, parts.remove]) {
      if (control.disabled !== item.deleting) control.disabled = item.deleting;
    }
    if (item.deleting && editors.has(item.id)) {
      editors.delete(item.id);
      parts.editor.hidden = true;
    }

    parts.marker.hidden = !item.pending;
    // The stuck row below carries the "still processing" wording; the marker stays terse so
    // that text appears once per stuck operation.
    setText(parts.marker, stuckOps.length ? stuckWording(stuckOps[0]).marker : item.deleting ? 'deleting…' : 'saving…');
    setAttr(parts.marker, 'title', item.ops.map((op) => `${op.description}: ${op.state}`).join('\n'));

    renderStuckRows(parts, stuckOps);
    renderConflict(parts, item);
    parts.item = item;
  }

  /**
   * How a stuck op reads, by what it waits on: the server, which has it and has not
   * confirmed it, or a send no attempt of which got through (`unreached`). `marker` is
   * the row's terse word, `text` the line of its stuck row.
   */
  function stuckWording(op) {
    if (op.state === 'queued') {
      return { marker: 'waiting', text: `${op.description}: not sent yet, it waits for the change before it on this task.` };
    }
    if (!op.unreached && !op.accepted) {
      // No 202 yet, and no attempt has failed: its send is on its way (behind a slow one on
      // the task, or a slow answer), or waits for the page to reach the server again.
      return { marker: 'no answer yet', text: `${op.description}: no answer from the server yet.` };
    }
    if (!op.unreached) {
      // The server has it (its 202 came); that it cannot be asked now is worth saying.
      const away = connection === 'unreachable' ? ' The server cannot be reached now.' : '';
      return { marker: 'not confirmed', text: `${op.description}: still processing. The server has not confirmed it yet.${away}` };
    }
    if (op.unreached.offline) {
      return { marker: 'no answer', text: `${op.description}: no answer, the server cannot be reached. It is sent again (same key) when the connection is back.` };
    }
    const again = resentByItself(op.unreached) ? ' It is sent again (same key) after a pause.' : '';
    return { marker: 'not sent', text: `${op.description}: not sent, the server did not take it (${op.unreached.detail}).${again}` };
  }

  /** One row per stuck op, keyed by its idempotency key: Retry sends it again, same key. */
  function renderStuckRows(parts, stuckOps) {
    const keys = new Set(stuckOps.map((op) => op.key));
    for (const [key, { row }] of parts.stuckRows) {
      if (!keys.has(key)) {
        row.remove();
        parts.stuckRows.delete(key);
      }
    }
    for (const op of stuckOps) {
      // An op stuck on its timeout may learn later that no attempt got through: the text follows.
      const known = parts.stuckRows.get(op.key);
      if (known) {
        setText(known.text, stuckWording(op).text);
        continue;
      }
      const row = element('div', { class: 'stuck-row', 'data-testid': 'stuck', 'data-key': op.key, role: 'alert' });
      const text = element('span', {}, stuckWording(op).text);
      const retry = element('button', { type: 'button', 'data-testid': 'retry' }, 'Retry');
      const discard = element('button', { type: 'button', 'data-testid': 'discard' }, 'Discard');
      retry.addEventListener('click', () => sync.retry(op.key));
      discard.addEventListener('click', () => sync.discard(op.key));
      row.append(text, retry, discard);
      parts.stuckRows.set(op.key, { row, text });
    }
    // In the ops' order: one stuck again after a Retry goes back to its place, not last.
    stuckOps.forEach((op, index) => {
      const { row } = parts.stuckRows.get(op.key);
      const atIndex = parts.stuck.children[index];
      if (atIndex !== row) parts.stuck.insertBefore(row, atIndex ?? null);
    });
  }

  const FIELD_LABELS = { title: 'Title', notes: 'Notes', done: 'Done', deleted: 'Deleted' };

  function fieldText(field, value) {
    if (field === 'done' || field === 'deleted') return value ? 'yes' : 'no';
    return value === '' ? '(empty)' : String(value);
  }

  /** The inline yours / theirs view of a refused edit; rebuilt only when the conflict changes. */
  function renderConflict(parts, item) {
    const { conflict } = item;
    // Not while the task is being deleted: the delete answered it (a failed one shows it again).
    parts.conflict.hidden = !conflict || item.deleting;
    if (parts.conflictFor === conflict) return;
    parts.conflictFor = conflict;
    parts.conflict.replaceChildren();
    if (!conflict) return;
    const what = conflict.kind === 'delete' ? 'your delete' : 'your edit';
    // Nobody changed what the user edited: say that the version kept moving, not who.
    const headingText = conflict.kept_moving
      ? `The task kept changing while ${what} was sent (likes, or other changes to it), so it was not applied. Nothing was overwritten: send it again or leave it.`
      : `Someone else changed this task before ${what} applied. Nothing was overwritten: choose.`;
    const heading = element('p', { class: 'conflict-heading' }, headingText);
    const table = element('div', { class: 'conflict-sides' });
    const yours = element('div', { class: 'side yours', 'data-testid': 'conflict-yours' });
    const theirs = element('div', { class: 'side theirs', 'data-testid': 'conflict-theirs' });
    yours.append(element('strong', {}, 'Yours'));
    theirs.append(element('strong', {}, 'Theirs'));
    for (const [field, value] of Object.entries(conflict.yours)) {
      const label = FIELD_LABELS[field] ?? field;
      yours.append(element('div', { 'data-field': field }, `${label}: ${fieldText(field, value)}`));
      const current = field === 'deleted' ? false : conflict.theirs[field];
      theirs.append(element('div', { 'data-field': field }, `${label}: ${fieldText(field, current)}`));
    }
    // A delete sets no field: theirs shows what they changed, which the user had not seen.
    if (conflict.kind === 'delete') {
      for (const field of conflict.changed) {
        theirs.append(element('div', { 'data-field': field }, `${FIELD_LABELS[field]}: ${fieldText(field, conflict.theirs[field])}`));
      }
    }
    table.append(yours, theirs);
    const keep = element('button', { type: 'button', 'data-testid': 'keep-mine' }, 'Keep mine');
    const take = element('button', { type: 'button', 'data-testid': 'take-theirs' }, 'Take theirs');
    keep.addEventListener('click', () => sync.keepMine(item.id));
    take.addEventListener('click', () => sync.takeTheirs(item.id));
    parts.conflict.append(heading, table, keep, take);
  }

  function renderList(items, loaded) {
    const visible = new Set(items.map((item) => item.id));
    for (const [taskId, parts] of taskNodes) {
      if (!visible.has(taskId)) {
        parts.li.remove();
        taskNodes.delete(taskId);
        editors.delete(taskId);
      }
    }
    items.forEach((item, index) => {
      const parts = taskNodes.get(item.id) ?? createTaskNode(item.id);
      if (parts.item !== item) updateTaskNode(parts, item);
      // Move a node only when it is out of place: moving detaches it, which drops focus.
      const atIndex = list.children[index];
      if (atIndex !== parts.li) list.insertBefore(parts.li, atIndex ?? null);
    });
    // Before the first snapshot only the tab's own pending creates are known (restored
    // after a reload): say so, rather than show them as if they were the whole list.
    setAttr(list, 'aria-busy', String(!loaded));
    const empty = $('empty');
    empty.hidden = loaded && items.length > 0;
    setText(empty, loaded ? 'No tasks yet.'
      : items.length ? 'Loading the task list… Until it comes, only your own pending changes are shown.'
        : 'Loading the task list…');
  }

  /** Redraw every row's like toggle: the browser's likes changed (another tab, a handover). */
  function redrawLikes() {
    for (const parts of taskNodes.values()) if (parts.item) drawLike(parts, parts.item);
  }

  /** The connection changed: the stuck rows' texts follow it. */
  function setConnection(state) {
    if (state === connection) return;
    connection = state;
    for (const parts of taskNodes.values()) {
      for (const op of parts.item?.ops ?? []) {
        const known = parts.stuckRows.get(op.key);
        if (known) setText(known.text, stuckWording(op).text);
      }
    }
  }

  return { render: renderList, redrawLikes, setConnection };
}
