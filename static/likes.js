// Likes as a toggle per browser, over a server-side counter of +1 / -1 deltas.
//
// The server keeps one number per task; it does not know who liked what. This browser
// keeps its own share of that number per task (its `contribution`: the deltas of its
// likes that settled, each tab's in a ledger of its own, summed), and a tab adds its
// pending deltas on top, as the core does for every other field:
// liked = contribution + pending > 0.
//
// Deltas commute and a failure removes only its own op, so a like that fails under an
// unlike stacked on it would leave this browser at -1 (and a discarded like applied
// after all, at +2). After an op of ours leaves its stack, `compensation` says which
// delta brings the browser's eventual share to what the user last asked for; the tab
// sends it as a new like or unlike. The arithmetic is pure; `createLikes` wires it to a
// core, a sync engine and storage, all passed in, so both are unit-tested with
// `node --test`.

/** Whether this browser likes the task, its pending deltas included. */
export function isLiked(contribution, pending) {
  return contribution + pending > 0;
}

/** The delta a click on the toggle sends. */
export function toggleDelta(contribution, pending) {
  return isLiked(contribution, pending) ? -1 : 1;
}

/**
 * The delta that brings this browser's eventual share (settled + pending) to what the
 * user last asked for (`wanted`: liked or not), or, with no click in play, back to 0 or
 * 1: +1 from -1, -1 from 2, and so on; 0 when it is there.
 */
export function compensation(contribution, pending, wanted) {
  const eventual = contribution + pending;
  if (wanted !== undefined) return (wanted ? 1 : 0) - eventual;
  if (eventual < 0) return -eventual;
  if (eventual > 1) return 1 - eventual;
  return 0;
}

/** Task id -> the sum of its shares over `ledgers` (maps of task id -> share). */
export function sumShares(ledgers) {
  const total = new Map();
  for (const ledger of ledgers) {
    for (const [taskId, share] of ledger) total.set(taskId, (total.get(taskId) ?? 0) + share);
  }
  for (const [taskId, share] of total) if (share === 0) total.delete(taskId);
  return total;
}

/** A stored map of task id -> contribution, read leniently (a bad value counts as none). */
export function readContributions(stored) {
  return readStoredMap(stored, (value) => Number.isInteger(value) && value !== 0);
}

// ---- the toggle's wiring: ledgers, intents, departures, compensation ----------------------

/** Each tab's ledger of its settled likes: task id -> share (localStorage). */
export const LEDGER_PREFIX = 'settle.like-ledger.v1.';
/** Each tab's intents: task id -> [liked, at] of the user's last click still in play. */
export const INTENT_PREFIX = 'settle.like-intent.v1.';
/** Before the ledgers: the set of task ids this browser liked, still counted. */
export const LEGACY_LIKED_KEY = 'settle.liked.v1';
/** This tab's id (sessionStorage, so a reload keeps it). */
export const TAB_ID_KEY = 'settle.tab-id.v1';
/** This tab's clicks still in play, by task (sessionStorage, so a reload keeps them). */
export const CLICKS_KEY = 'settle.like-clicks.v1';
/**
 * Compensations that fail in a row on a task before the tab stops sending them (until the
 * next click, or until a like of the tab's settles on the task): a server that fails them
 * all cannot loop it, and one that fails some (a failure rate) does not strand the share.
 */
export const MAX_FAILED_COMPENSATIONS = 5;
/** Compensations per task per click, whatever becomes of them. */
export const MAX_COMPENSATIONS_PER_CLICK = 20;
/** How many tasks a tab keeps clicks for; the oldest go first. */
export const MAX_CLICKED_TASKS = 200;

/**
 * The intent a tab's clicks on one task leave: the last click still in play. A click
 * whose like or unlike failed, was refused or discarded is out of play: what it asked
 * for did not happen, and the toggle rolls back to the click before it. Clicks before
 * the last one that settled can never be the intent again, so they are dropped.
 *
 * @param {{key: string, liked: boolean, at: number}[]} clicks oldest first
 */
export function intentOf(clicks) {
  return clicks.length ? clicks[clicks.length - 1] : undefined;
}

/** `clicks` once the op of `key` settled: the clicks before it are dropped. */
export function clickSettled(clicks, key) {
  const index = clicks.findIndex((click) => click.key === key);
  return index < 0 ? clicks : clicks.slice(index);
}

/** `clicks` without the click of op `key` (its op left without applying). */
export function clickWithdrawn(clicks, key) {
  return clicks.filter((click) => click.key !== key);
}

/**
 * The browser's intent on each task: of every tab's intents, the latest click's.
 * `records` are [tab id, Map task id -> [liked, at]]; ties go to the greater tab id.
 */
export function latestIntents(records) {
  const latest = new Map();
  for (const [tab, intents] of records) {
    for (const [taskId, [liked, at]] of intents) {
      const known = latest.get(taskId);
      if (!known || at > known.at || (at === known.at && tab > known.tab)) latest.set(taskId, { liked, at, tab });
    }
  }
  return latest;
}

/** A stored map of task id -> [liked, at], read leniently. */
export function readIntents(stored) {
  return readStoredMap(stored, (value) => Array.isArray(value) && typeof value[0] === 'boolean' && Number.isFinite(value[1]));
}

/** The keys whose values differ between two maps (compared as JSON). */
function differing(before, after) {
  return [...new Set([...before.keys(), ...after.keys()])]
    .filter((key) => JSON.stringify(before.get(key)) !== JSON.stringify(after.get(key)));
}

/** A stored JSON object as a Map of its entries whose value `isValid`; anything else, none. */
function readStoredMap(stored, isValid) {
  try {
    const parsed = JSON.parse(stored ?? '{}');
    if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) return new Map();
    return new Map(Object.entries(parsed).filter(([, value]) => isValid(value)));
  } catch {
    return new Map();
  }
}

/**
 * The like toggle of one tab, wired to its core and sync engine.
 *
 * - The share: this tab writes its own ledger; every tab's ledger summed is the browser's.
 * - The intent: each click is recorded with the op it sent; the tab's intent on a task is
 *   its last click still in play, written to localStorage under the tab's id with the
 *   click's time, so the browser's intent is the latest click of any tab.
 * - Compensation: when the browser's eventual share (settled + this tab's pending) is not
 *   what the intent asks (1 or 0), or out of 0..1 where no click is in play, a like or
 *   unlike is sent that brings it there: a like that failed under an unlike stacked on it,
 *   two tabs that both liked in one window, a discarded like applied after all.
 * - Who compensates: the tab that holds the browser's intent, on its own ops leaving and on
 *   other tabs' ledgers changing. Another tab, on its own ops leaving, only when that tab
 *   is gone (`isTabAlive`). One tab acting on a task, not two, so they cannot overshoot
 *   each other (each sees only its own pending ops).
 *
 * @param {{core: object, sync: object, local?: Storage | null, session?: Storage | null,
 *   newId?: () => string, now?: () => number, isTabAlive?: (tabId: string) => Promise<boolean>,
 *   log?: (message: string, error?: unknown) => void}} options
 */
export function createLikes({
  core,
  sync,
  local = null,
  session = null,
  newId = () => crypto.randomUUID(),
  now = Date.now,
  isTabAlive = async () => false,
  log = () => {},
}) {
  const guard = (what, fallback) => {
    try {
      return what();
    } catch (error) {
      log('storage unavailable', error);
      return fallback;
    }
  };
  const tabId = guard(() => session?.getItem(TAB_ID_KEY), null) ?? newId();
  guard(() => session?.setItem(TAB_ID_KEY, tabId));
  const ledgerKey = `${LEDGER_PREFIX}${tabId}`;
  const intentKey = `${INTENT_PREFIX}${tabId}`;

  /** This tab's ledger: memory is its truth (only this tab writes it), storage its copy. */
  const ledger = readContributions(guard(() => local?.getItem(ledgerKey), null));
  /** task id -> this tab's clicks still in play, oldest first. */
  const clicks = readClicks(guard(() => session?.getItem(CLICKS_KEY), null));
  /** The keys of the compensations this tab sent, to tell their failures apart. */
  const compensations = new Set();
  /** Per task: compensations sent since the user's last click, and failed since the last settle. */
  const sentSinceClick = new Map();
  const failedInARow = new Map();
  let shares = new Map();
  let intents = new Map();
  readBrowser();

  function readClicks(stored) {
    const isClick = (click) => typeof click?.key === 'string' && typeof click.liked === 'boolean' && Number.isFinite(click.at);
    try {
      const parsed = JSON.parse(stored ?? '[]');
      return new Map((Array.isArray(parsed) ? parsed : [])
        .filter((entry) => Array.isArray(entry) && typeof entry[0] === 'string' && Array.isArray(entry[1]))
        .map(([taskId, list]) => [taskId, list.filter(isClick)]));
    } catch {
      return new Map();
    }
  }

  /** Every tab's ledger and intents, this tab's from memory; the liked ids from before. */
  function readBrowser() {
    const ledgers = [ledger];
    const records = [[tabId, ownIntents()]];
    guard(() => {
      if (!local) return;
      for (let index = 0; index < local.length; index += 1) {
        const key = local.key(index);
        if (key === ledgerKey || key === intentKey) continue;
        if (key.startsWith(LEDGER_PREFIX)) ledgers.push(readContributions(local.getItem(key)));
        if (key.startsWith(INTENT_PREFIX)) records.push([key.slice(INTENT_PREFIX.length), readIntents(local.getItem(key))]);
      }
      const liked = JSON.parse(local.getItem(LEGACY_LIKED_KEY) ?? '[]');
      if (Array.isArray(liked)) ledgers.push(new Map(liked.filter((id) => typeof id === 'string').map((id) => [id, 1])));
    });
    shares = sumShares(ledgers);
    intents = latestIntents(records);
  }

  function ownIntents() {
    const own = new Map();
    for (const [taskId, list] of clicks) {
      const intent = intentOf(list);
      if (intent) own.set(taskId, [intent.liked, intent.at]);
    }
    return own;
  }

  function writeClicks() {
    while (clicks.size > MAX_CLICKED_TASKS) clicks.delete(clicks.keys().next().value);
    guard(() => session?.setItem(CLICKS_KEY, JSON.stringify([...clicks])));
    guard(() => local?.setItem(intentKey, JSON.stringify(Object.fromEntries(ownIntents()))));
  }

  function setClicks(taskId, list) {
    clicks.delete(taskId); // re-inserted last: the most recently touched task goes last
    if (list.length) clicks.set(taskId, list);
  }

  function addToLedger(taskId, delta) {
    const next = (ledger.get(taskId) ?? 0) + delta;
    if (next === 0) ledger.delete(taskId);
    else ledger.set(taskId, next);
    guard(() => local?.setItem(ledgerKey, JSON.stringify(Object.fromEntries(ledger))));
  }

  /** This tab's pending like deltas on a task. */
  function pendingOn(taskId) {
    let net = 0;
    for (const op of core.pendingOps()) if (op.kind === 'like' && op.task_id === taskId) net += op.delta;
    return net;
  }

  /** Send what brings the eventual share to what the intent asks, within the bounds. */
  function compensate(taskId) {
    if (core.isDeleted(taskId) || !core.confirmedTask(taskId)) return;
    if ((failedInARow.get(taskId) ?? 0) >= MAX_FAILED_COMPENSATIONS) return;
    const delta = compensation(shares.get(taskId) ?? 0, pendingOn(taskId), intents.get(taskId)?.liked);
    const sent = sentSinceClick.get(taskId) ?? 0;
    const count = Math.min(Math.abs(delta), MAX_COMPENSATIONS_PER_CLICK - sent);
    if (count <= 0) return;
    sentSinceClick.set(taskId, sent + count);
    for (let index = 0; index < count; index += 1) compensations.add(sync.like(taskId, Math.sign(delta)).key);
  }

  /** After an op of ours on the task left: this tab acts if it holds the intent, or its holder is gone. */
  function ownOpLeft(taskId) {
    const holder = intents.get(taskId)?.tab;
    if (holder === undefined || holder === tabId) return compensate(taskId);
    isTabAlive(holder).then((alive) => {
      if (!alive && intents.get(taskId)?.tab === holder) compensate(taskId);
    }, (error) => log('cannot tell whether a tab is open', error));
    return undefined;
  }

  const unsubscribe = core.subscribe(() => {
    const touched = new Set();
    let clicksChanged = false;
    for (const { op, outcome, reason } of core.takeDeparted()) {
      if (op.kind !== 'like') continue;
      const list = clicks.get(op.task_id);
      if (outcome === 'settled' || outcome === 'applied_late') {
        addToLedger(op.task_id, op.delta);
        failedInARow.delete(op.task_id);
      } else if (compensations.has(op.key) && reason !== 'not_found') {
        failedInARow.set(op.task_id, (failedInARow.get(op.task_id) ?? 0) + 1);
      }
      compensations.delete(op.key);
      if (list && outcome === 'settled') setClicks(op.task_id, clickSettled(list, op.key));
      else if (list && outcome !== 'applied_late') setClicks(op.task_id, clickWithdrawn(list, op.key));
      clicksChanged ||= Boolean(list);
      // Settled too: another tab of this browser may have liked in the same window (a tab
      // does not see another's pending ops), which leaves the share at 2.
      if (reason !== 'not_found') touched.add(op.task_id);
    }
    if (clicksChanged) writeClicks();
    if (clicksChanged || touched.size) readBrowser();
    for (const taskId of touched) ownOpLeft(taskId);
  });

  return {
    tabId,
    /** Whether this browser likes the task, with this tab's `pending` deltas on it. */
    isLiked(taskId, pending) {
      return isLiked(shares.get(taskId) ?? 0, pending);
    },
    /** A click: the delta that flips the toggle as shown, recorded as this tab's intent. */
    toggle(taskId) {
      const liked = !isLiked(shares.get(taskId) ?? 0, pendingOn(taskId));
      const op = sync.like(taskId, liked ? 1 : -1);
      sentSinceClick.delete(taskId);
      failedInARow.delete(taskId);
      setClicks(taskId, [...(clicks.get(taskId) ?? []), { key: op.key, liked, at: now() }]);
      writeClicks();
      readBrowser();
      return op;
    },
    /**
     * Another tab wrote `key` (a `storage` event; `null` when storage was cleared).
     * Returns whether anything the toggles show may have changed. The tab that holds the
     * browser's intent on a task whose share or intent moved brings it where it should be.
     */
    storageChanged(key) {
      if (key !== null && !key.startsWith(LEDGER_PREFIX) && !key.startsWith(INTENT_PREFIX)
        && key !== LEGACY_LIKED_KEY) return false;
      const [sharesBefore, intentsBefore] = [shares, intents];
      readBrowser();
      const moved = new Set([...differing(sharesBefore, shares), ...differing(intentsBefore, intents)]);
      for (const taskId of moved) if (intents.get(taskId)?.tab === tabId) compensate(taskId);
      return true;
    },
    stop: unsubscribe,
  };
}
