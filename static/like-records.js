// What the tabs of one browser keep about likes in storage, and how it is read back.
//
// localStorage, shared by the tabs: each tab's record (`TAB_RECORD_PREFIX` + its id), the
// like ops a closed tab left pending (`ORPHANS_PREFIX` + its id), and the formats from
// before the records, still counted. sessionStorage, the tab's own: its id and its clicks.
// Every reader is lenient: a value that does not parse, or an entry of the wrong shape,
// counts as none, so a stored value from another version never breaks a page. What the
// toggle does with them is static/likes.js.

/**
 * Each tab's record (localStorage), one key per tab so that no tab writes what another
 * writes: its settled `share` of each task's likes, its `pending` deltas, and its
 * `intent` (the user's last click still in play, with its time). One key, so that another
 * tab never reads a like settled in the share and still pending beside it.
 */
export const TAB_RECORD_PREFIX = 'settle.like-tab.v2.';
/** Before the records: each tab's ledger of settled likes, task id -> share; still counted. */
export const LEGACY_LEDGER_PREFIX = 'settle.like-ledger.v1.';
/** Before the ledgers: the set of task ids this browser liked, still counted. */
export const LEGACY_LIKED_KEY = 'settle.liked.v1';
/** This tab's id (sessionStorage, so a reload keeps it). */
export const TAB_ID_KEY = 'settle.tab-id.v1';
/**
 * Likes of this tab that settled while its page did not know its id yet, so wrote no
 * record: task id -> delta (sessionStorage), for the next page of the tab should this one
 * go first (a reload in that window lost them).
 */
export const UNFLUSHED_KEY = 'settle.like-unflushed.v1';
/** This tab's clicks still in play, by task (sessionStorage, so a reload keeps them). */
export const CLICKS_KEY = 'settle.like-clicks.v1';
/**
 * The like ops a tab had pending when its page went away (`{ops, at}`), for another tab
 * to take over if it does not come back; once taken, `{taken: [keys], at}`, so that the
 * tab, reopened with its session, leaves them to the taker.
 */
export const ORPHANS_PREFIX = 'settle.like-orphans.v1.';
/** The Web Lock under which a tab takes over orphans, or takes back its own. */
export const ORPHANS_LOCK = 'settle.like-orphans';
/** How long orphans wait for their tab to come back (a reload) before another takes them. */
export const ADOPT_AFTER_MS = 3000;
/** How often a tab looks for the records of tabs gone (`sweep`, like-handover.js). */
export const SWEEP_EVERY_MS = 60 * 1000;
/** How long a record of taken orphans is kept for its tab to be reopened. */
export const KEEP_TAKEN_MS = 24 * 60 * 60 * 1000;
/**
 * How long after its page went away a closed tab's record is taken into an open tab's
 * (its share and its intents), so that records do not pile up, one per tab ever opened:
 * well past the back/forward cache's few minutes, the one way a page that left runs again
 * without reading storage afresh.
 */
export const ABSORB_AFTER_MS = 60 * 60 * 1000;

/** The like ops in a stored list, read leniently (anything else is left out). */
export function likeOps(list) {
  return (Array.isArray(list) ? list : []).filter((op) => op?.kind === 'like' && typeof op.key === 'string'
    && typeof op.task_id === 'string' && (op.delta === 1 || op.delta === -1));
}

/** A stored orphans record, read leniently. */
export function readOrphans(stored) {
  try {
    const parsed = JSON.parse(stored ?? 'null');
    const at = Number.isFinite(parsed?.at) ? parsed.at : 0;
    if (Array.isArray(parsed?.taken)) return { taken: parsed.taken.filter((key) => typeof key === 'string'), at };
    return { ops: likeOps(parsed?.ops), at };
  } catch {
    return { ops: [], at: 0 };
  }
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
  return entriesOf(stored, isShare);
}

/** A JSON object (or its text) as a Map of its entries whose value `isValid`; anything else, none. */
function entriesOf(value, isValid) {
  let parsed = value;
  try {
    if (typeof value === 'string' || value == null) parsed = JSON.parse(value ?? '{}');
  } catch {
    return new Map();
  }
  if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) return new Map();
  return new Map(Object.entries(parsed).filter(([, entry]) => isValid(entry)));
}

const isShare = (value) => Number.isInteger(value) && value !== 0;
const isTabId = (value) => typeof value === 'string' && value !== '';
const isIntent = (value) => Array.isArray(value) && typeof value[0] === 'boolean' && Number.isFinite(value[1]);

/**
 * A tab's record as stored (its text): `share` and `pending`, task id -> delta, and
 * `intent`, task id -> [liked, at]; `ops`, its pending like ops (for another tab to take
 * over should it crash); `left`, when its page went away (null while it is open);
 * `absorbed`, the tabs whose records it took in (`ABSORB_AFTER_MS`). Read leniently:
 * anything malformed counts as none.
 */
export function readTabRecord(stored) {
  let parsed = null;
  try {
    parsed = JSON.parse(stored ?? 'null');
  } catch {
    // counts as empty
  }
  return {
    share: entriesOf(parsed?.share ?? {}, isShare),
    pending: entriesOf(parsed?.pending ?? {}, isShare),
    intent: entriesOf(parsed?.intent ?? {}, isIntent),
    ops: likeOps(parsed?.ops),
    left: Number.isFinite(parsed?.left) ? parsed.left : null,
    absorbed: Array.isArray(parsed?.absorbed) ? parsed.absorbed.filter(isTabId) : [],
  };
}

/**
 * Every tab's record in `storage` that counts, as [tab id, record]: not a closed tab's
 * that another record names as taken in (the taker's removal of it comes next). One
 * written since by its tab, back and open, counts again: the taker of a record that names
 * it cannot have left it behind on purpose, only by crashing between the two writes.
 */
export function tabRecords(storage) {
  const records = [];
  for (let index = 0; index < storage.length; index += 1) {
    const key = storage.key(index);
    if (key?.startsWith(TAB_RECORD_PREFIX)) records.push([key.slice(TAB_RECORD_PREFIX.length), readTabRecord(storage.getItem(key))]);
  }
  const absorbed = new Set(records.flatMap(([, record]) => record.absorbed));
  return records.filter(([tab, record]) => record.left === null || !absorbed.has(tab));
}

/** Task id -> this browser's settled share, from every record (and ledger) in `storage`. */
export function browserShares(storage) {
  const ledgers = tabRecords(storage).map(([, record]) => record.share);
  for (let index = 0; index < storage.length; index += 1) {
    const key = storage.key(index);
    if (key.startsWith(LEGACY_LEDGER_PREFIX)) ledgers.push(readContributions(storage.getItem(key)));
  }
  ledgers.push(legacyLiked(storage.getItem(LEGACY_LIKED_KEY)));
  return sumShares(ledgers);
}

/** The set of liked task ids from before the ledgers, each a share of 1. */
export function legacyLiked(stored) {
  try {
    const liked = JSON.parse(stored ?? '[]');
    return new Map(Array.isArray(liked) ? liked.filter((id) => typeof id === 'string').map((id) => [id, 1]) : []);
  } catch {
    return new Map();
  }
}

/** This tab's stored clicks (sessionStorage), task id -> clicks, read leniently. */
export function readClicks(stored) {
  const isClick = (click) => (typeof click?.key === 'string' || click?.key === null)
    && typeof click.liked === 'boolean' && Number.isFinite(click.at);
  try {
    const parsed = JSON.parse(stored ?? '[]');
    return new Map((Array.isArray(parsed) ? parsed : [])
      .filter((entry) => Array.isArray(entry) && typeof entry[0] === 'string' && Array.isArray(entry[1]))
      .map(([taskId, list]) => [taskId, list.filter(isClick)]));
  } catch {
    return new Map();
  }
}
