// The thin view: renders the core's snapshot into the page and turns clicks into intents.
//
// Rules it keeps:
// - text goes in with textContent, never innerHTML: a task titled
//   `<img src=x onerror=alert(1)>` is shown as those characters;
// - one DOM node per task, kept in a Map and updated in place, so settling an item never
//   remounts it (no flicker, focus stays where it was): the task list, task-list.js;
// - every decision (what is pending, stuck, in conflict) is the core's; this file only draws.

import { createCore } from './core.js';
import { createTransport } from './transport.js';
import { createSync } from './sync.js';
import { createLikes } from './likes.js';
import { TAB_RECORD_PREFIX } from './like-records.js';
import { createPanels } from './panels.js';
import { createTaskList } from './task-list.js';
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
/** The task list's rows (task-list.js): their like toggles are this one's. */
const taskList = createTaskList({ core, sync, likeToggle });
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

// Another tab of this browser liked or unliked: take its shares and intents (a `storage`
// event never fires in the tab that wrote), so a click here toggles from where the
// browser stands.
window.addEventListener('storage', (event) => {
  if (likeToggle.storageChanged(event.key)) redrawLikes();
  if (event.key?.startsWith(TAB_RECORD_PREFIX) && !watchedTabs.has(event.key.slice(TAB_RECORD_PREFIX.length))) watchTabs();
});

function redrawLikes() {
  taskList.redrawLikes();
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
  if (snapshot.items !== rendered?.items || snapshot.loaded !== rendered?.loaded) taskList.render(snapshot.items, snapshot.loaded);
  if (snapshot.notices !== rendered?.notices) renderNotices(snapshot.notices);
  if (snapshot.sync !== rendered?.sync) renderSync(snapshot.sync);
  if (snapshot.connection !== rendered?.connection) {
    renderConnection(snapshot.connection);
    taskList.setConnection(snapshot.connection);
  }
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
  // Back online: what could not be sent goes at once.
  window.addEventListener('online', () => sync.online());
  bindNewTaskForm();
  render();
  sync.start();
  panels.start();
  // The tooltip's "how old" moves with time even when the core does not.
  setInterval(() => refreshSyncText(core.getSnapshot().sync), 250);
}

main();
