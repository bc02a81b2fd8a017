// The thin view: renders the core's snapshot into the page and turns clicks into intents.
//
// Rules it keeps:
// - text goes in with textContent, never innerHTML: a task titled
//   `<img src=x onerror=alert(1)>` is shown as those characters;
// - one DOM node per task, kept in a Map and updated in place, so settling an item never
//   remounts it (no flicker, focus stays where it was);
// - every decision (what is pending, stuck, in conflict) is the core's; this file only draws.

import { createCore } from './core.js';
import { createTransport } from './transport.js';
import { createSync } from './sync.js';
import { createLikes } from './likes.js';
import { TAB_RECORD_PREFIX } from './like-records.js';
import { createPanels } from './panels.js';
import { $, element, setAttr, setText } from './dom.js';

// ---- configuration from the URL: ?stuck_ms=5000&sync_ms=800 -----------------------------

function numberParam(params, name, fallback) {
  const value = Number(params.get(name));
  return params.has(name) && Number.isFinite(value) && value >= 0 ? value : fallback;
}

const params = new URLSearchParams(location.search);
const STUCK_MS = numberParam(params, 'stuck_ms', 5000);
const SYNC_MS = numberParam(params, 'sync_ms', 800);
/** How long after a tab closed its like record is taken into an open tab's (likes.js). */
const ABSORB_AFTER_MS = numberParam(params, 'absorb_after_ms', 60 * 60 * 1000);

const core = createCore({ now: Date.now, stuckMs: STUCK_MS, syncMs: SYNC_MS });
const transport = createTransport();
const sync = createSync({
  core,
  transport,
  storage: safeStorage(() => sessionStorage),
  tickMs: Math.max(20, Math.min(100, SYNC_MS / 4)),
  log: (message, error) => console.warn(`settle: ${message}`, error ?? ''),
});
// A handle for the console and for end-to-end tests that need to poke the machinery.
window.settle = { core, sync, transport };
const panels = createPanels({ transport, windowSamples: () => core.getSnapshot().window_samples });

function safeStorage(get) {
  try {
    return get();
  } catch {
    return null; // storage disabled: pending ops then live only as long as the page
  }
}

// ---- likes as a toggle (static/likes.js) ---------------------------------------------------

/**
 * Whether another tab of this browser is still open: each tab holds a Web Lock named for
 * its id as long as it lives, so a tab that holds the browser's intent on a task but was
 * closed leaves its compensations to the others (likes.js).
 */
const TAB_LOCK_PREFIX = 'settle.tab.';

/**
 * The ids of this browser's open tabs (their locks held), or undefined without Web Locks.
 * A tab holds its own lock exclusively; a shared hold is another tab's look (`watchTabs`).
 */
async function liveTabs() {
  if (!navigator.locks) return undefined;
  const { held = [] } = await navigator.locks.query();
  return held.filter((lock) => lock.mode === 'exclusive' && lock.name.startsWith(TAB_LOCK_PREFIX))
    .map((lock) => lock.name.slice(TAB_LOCK_PREFIX.length));
}

/**
 * Each other open tab's lock, asked for in shared mode: granted once that tab is gone
 * (closed, reloading, or crashed, which writes nothing), and let go at once. Then this tab
 * looks for what it left, at once instead of at its next look within a minute
 * (like-handover.js). Asked again for the tabs open now on start and when a tab writes
 * its record (a tab that opened or came back).
 */
const watchedTabs = new Set();
function watchTabs() {
  liveTabs().then((ids) => {
    for (const id of ids ?? []) {
      if (id === likeToggle.tabId || watchedTabs.has(id)) continue;
      watchedTabs.add(id);
      navigator.locks.request(`${TAB_LOCK_PREFIX}${id}`, { mode: 'shared' }, () => {})
        .then(() => {
          watchedTabs.delete(id);
          return likeToggle.sweep();
        })
        .catch((error) => console.warn('settle: cannot look at a tab gone', error));
    }
  }).catch((error) => console.warn('settle: cannot watch the other tabs', error));
}

/** Whether tab `id` is open; undefined without Web Locks (cannot tell: taken for gone, never for crashed). */
async function isTabAlive(id) {
  return (await liveTabs())?.includes(id);
}

const likeToggle = createLikes({
  core,
  sync,
  local: safeStorage(() => localStorage),
  session: safeStorage(() => sessionStorage),
  isTabAlive,
  liveTabs,
  withLock: (name, critical) => (navigator.locks ? navigator.locks.request(name, critical) : Promise.resolve().then(critical)),
  onChange: () => redrawLikes(),
  identityPending: true, // until this page holds its tab's lock, or finds it a copy's (below)
  absorbAfterMs: ABSORB_AFTER_MS,
  log: (message, error) => console.warn(`settle: ${message}`, error ?? ''),
});
/** How long a page waits for its tab's lock before it takes itself for a copy of another page. */
const COPY_CHECK_MS = 2000;

/**
 * Hold this tab's Web Lock for the page's life. A page opened as a copy of another
 * (window.open, Duplicate tab) came with its sessionStorage, tab id included, and finds
 * the lock held: it takes an id of its own. A reload's old page may hold it a moment longer.
 */
async function holdTabLock() {
  if (!navigator.locks) return likeToggle.confirmTab();
  const holdForever = () => new Promise(() => {});
  try {
    return await navigator.locks.request(`${TAB_LOCK_PREFIX}${likeToggle.tabId}`, { signal: AbortSignal.timeout(COPY_CHECK_MS) }, () => {
      likeToggle.confirmTab();
      watchTabs();
      return holdForever();
    });
  } catch (error) {
    if (error?.name !== 'TimeoutError' && error?.name !== 'AbortError') throw error;
    likeToggle.becomeCopy();
    watchTabs();
    return navigator.locks.request(`${TAB_LOCK_PREFIX}${likeToggle.tabId}`, holdForever);
  }
}
holdTabLock().catch((error) => console.warn('settle: cannot hold the tab lock', error));
window.settle.likes = likeToggle;
// Gone, its pending likes are left for another tab to take over, unless it comes back (a
// reload, or the back/forward cache) and takes them back.
window.addEventListener('pagehide', () => likeToggle.leave());
window.addEventListener('pageshow', (event) => { if (event.persisted) likeToggle.resume(); });
// Back to this tab: a good moment to look for tabs that crashed meanwhile.
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible') likeToggle.sweep().catch((error) => console.warn('settle: cannot look for closed tabs', error));
});

/** An item's toggle: its own ops give the pending deltas (no scan of every op). */
function drawLike(parts, item) {
  const pending = item.ops.reduce((net, op) => net + (op.kind === 'like' ? op.delta : 0), 0);
  const liked = likeToggle.isLiked(item.id, pending);
  setAttr(parts.likeButton, 'aria-pressed', String(liked));
  setText(parts.likeButton, liked ? '♥ Liked' : '♡ Like');
}

// Another tab of this browser liked or unliked: take its shares and intents (a `storage`
// event never fires in the tab that wrote), so a click here toggles from where the
// browser stands.
window.addEventListener('storage', (event) => {
  if (likeToggle.storageChanged(event.key)) redrawLikes();
  if (event.key?.startsWith(TAB_RECORD_PREFIX) && !watchedTabs.has(event.key.slice(TAB_RECORD_PREFIX.length))) watchTabs();
});

function redrawLikes() {
  for (const parts of taskNodes.values()) if (parts.item) drawLike(parts, parts.item);
}

// ---- the task list -------------------------------------------------------------------------

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

  renderStuckRows(parts, item.id, stuckOps);
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
    return { marker: 'not confirmed', text: `${op.description}: still processing. The server has not confirmed it yet.` };
  }
  if (op.unreached.offline) {
    return { marker: 'no answer', text: `${op.description}: no answer, the server cannot be reached. It is sent again (same key) when the connection is back.` };
  }
  return { marker: 'not sent', text: `${op.description}: not sent, the server did not take it (${op.unreached.detail}).` };
}

/** One row per stuck op, keyed by its idempotency key: Retry sends it again, same key. */
function renderStuckRows(parts, taskId, stuckOps) {
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
    parts.stuck.append(row);
    parts.stuckRows.set(op.key, { row, text });
  }
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

// ---- notices ------------------------------------------------------------------------------

const noticeNodes = new Map();

function renderNotices(notices) {
  const ids = new Set(notices.map((notice) => notice.id));
  let added = false;
  for (const [id, node] of noticeNodes) {
    if (!ids.has(id)) {
      node.remove();
      noticeNodes.delete(id);
    }
  }
  for (const notice of notices) {
    if (noticeNodes.has(notice.id)) continue;
    const node = element('div', {
      class: `notice ${notice.level}`,
      'data-testid': 'notice',
      'data-reason': notice.reason ?? '',
      'data-task-id': notice.task_id ?? '',
    });
    if (notice.level === 'error') node.setAttribute('role', 'alert');
    // Its "×" is drawn by CSS, so that the notice's text is the message alone.
    const dismiss = element('button', { type: 'button', class: 'dismiss', 'aria-label': 'Dismiss notice' });
    dismiss.addEventListener('click', () => sync.dismissNotice(notice.id));
    node.append(element('span', {}, notice.text), dismiss);
    $('notices').append(node);
    noticeNodes.set(notice.id, node);
    added = true;
  }
  // The list scrolls past a few: the newest is brought into its view.
  if (added) $('notices').scrollTop = $('notices').scrollHeight;
  $('dismiss-notices').hidden = notices.length < 2;
}

$('dismiss-notices').addEventListener('click', () => sync.dismissNotice());

// ---- chrome: sync indicator and connection -------------------------------------------------

let syncDot = null;

function syncDescription(syncState) {
  const ageMs = Date.now() - syncState.oldest_issued_at;
  const changes = syncState.count === 1 ? '1 change' : `${syncState.count} changes`;
  // A negative age: the clock was set back since they were made.
  if (ageMs < 0) return `${changes} waiting for the server`;
  return `${changes} waiting for the server, the oldest for ${(ageMs / 1000).toFixed(1)} s`;
}

/** The dot exists only while some pending op is older than sync_ms: absent, not hidden. */
function renderSync(syncState) {
  if (syncState.count === 0) {
    syncDot?.remove();
    syncDot = null;
    return;
  }
  if (!syncDot) {
    syncDot = element('span', { class: 'sync-indicator', 'data-testid': 'sync-indicator', role: 'img', tabindex: '0' });
    syncDot.append(element('span', { class: 'sync-dot' }), element('span', { class: 'sync-tooltip', 'data-testid': 'sync-tooltip' }));
    $('sync-slot').append(syncDot);
  }
  refreshSyncText(syncState);
}

function refreshSyncText(syncState) {
  if (!syncDot) return;
  const text = syncDescription(syncState);
  setAttr(syncDot, 'title', text);
  setAttr(syncDot, 'aria-label', text);
  setAttr(syncDot, 'data-count', String(syncState.count));
  setText(syncDot.lastChild, text);
}

const CONNECTION_TEXT = {
  connecting: 'connecting…',
  live: 'live',
  unresponsive: 'server not answering…',
  reconnecting: 'reconnecting…',
  unreachable: 'server unreachable, trying again…',
};

function renderConnection(state) {
  const node = $('connection');
  setAttr(node, 'data-state', state);
  setText(node, CONNECTION_TEXT[state] ?? state);
}

// ---- the new-task form ------------------------------------------------------------------------

/**
 * The draft being typed owns one task id and one idempotency key: submitting the same draft
 * twice (double Enter, double click) is the same intent, and the core keeps one op.
 */
let draft = null;

function bindNewTaskForm() {
  const form = $('new-task');
  const input = $('new-title');
  // Disabled in the page until now: Enter in the (focused) field would otherwise submit
  // the form to the page itself before this handler is there to take it.
  form.querySelector('button[type="submit"]').disabled = false;
  input.addEventListener('input', () => {
    draft = null;
  });
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const title = input.value.trim();
    if (!title) return;
    if (!draft || draft.title !== title) draft = { title, id: sync.newId(), key: sync.newId() };
    sync.createTask({ title, id: draft.id, key: draft.key });
    input.value = '';
  });
}

// ---- rendering loop -------------------------------------------------------------------------------

let rendered = null;
let renderQueued = false;

function render() {
  renderQueued = false;
  const snapshot = core.getSnapshot();
  if (snapshot === rendered) return;
  if (snapshot.items !== rendered?.items || snapshot.loaded !== rendered?.loaded) renderList(snapshot.items, snapshot.loaded);
  if (snapshot.notices !== rendered?.notices) renderNotices(snapshot.notices);
  if (snapshot.sync !== rendered?.sync) renderSync(snapshot.sync);
  if (snapshot.connection !== rendered?.connection) renderConnection(snapshot.connection);
  if (snapshot.window_samples !== rendered?.window_samples) panels.renderChart(snapshot.window_samples);
  rendered = snapshot;
}

/** Changes often come in bursts (an event, then its re-fetch): draw once, still before paint. */
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  queueMicrotask(render);
}

function main() {
  core.subscribe(scheduleRender);
  bindNewTaskForm();
  render();
  sync.start();
  panels.start();
  // The tooltip's "how old" moves with time even when the core does not.
  setInterval(() => refreshSyncText(core.getSnapshot().sync), 250);
}

main();
