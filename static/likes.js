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
// sends it as a new like or unlike. The arithmetic is pure (like-intents.js); `createLikes`
// wires it to a core, a sync engine and storage, all passed in, so both are unit-tested
// with `node --test`.

import {
  TAB_RECORD_PREFIX, LEGACY_LEDGER_PREFIX, LEGACY_LIKED_KEY, TAB_ID_KEY, CLICKS_KEY, ORPHANS_PREFIX, ORPHANS_LOCK, UNFLUSHED_KEY,
  ABSORB_AFTER_MS, readOrphans, readTabRecord, tabRecords, sumShares, readContributions, legacyLiked, readClicks,
} from './like-records.js';
import { createHandover } from './like-handover.js';
import {
  clickSettled, clickWithdrawn, compensation, intentOf, isLaterThan, isLiked, latestIntents, toggleDelta,
} from './like-intents.js';

/**
 * Compensations that fail in a row on a task before the tab pauses between them (until the
 * next click, or until a like of the tab's settles on the task): a server that fails them
 * all cannot loop it, and one that fails some (a failure rate) does not strand the share.
 */
export const MAX_FAILED_COMPENSATIONS = 5;
/**
 * The pauses after that, one per further failure, the last repeated: a failure rate that
 * strings several failures together delays the share, and no longer strands it.
 */
export const COMPENSATION_PAUSES_MS = Object.freeze([2_000, 4_000, 8_000, 16_000, 30_000]);
/** Compensations per task per click, whatever becomes of them. */
export const MAX_COMPENSATIONS_PER_CLICK = 20;
/** How many tasks a tab keeps clicks for; the oldest go first. */
export const MAX_CLICKED_TASKS = 200;

/** The keys whose values differ between two maps (compared as JSON). */
function differing(before, after) {
  return [...new Set([...before.keys(), ...after.keys()])]
    .filter((key) => JSON.stringify(before.get(key)) !== JSON.stringify(after.get(key)));
}

/**
 * The like toggle of one tab, wired to its core and sync engine.
 *
 * - Each tab writes one record: its settled share of each task's likes, its pending
 *   deltas and its intent. Every tab reads all of them, so the browser acts as one user:
 *   its share is every share summed, and what it will be once everything applies adds
 *   every tab's pending deltas.
 * - The intent: each click is recorded with the op it sent; the tab's intent on a task is
 *   its last click still in play, and the browser's is the latest of any tab's.
 * - Compensation: when the browser's eventual share is not what the intent asks (1 or 0),
 *   or out of 0..1 where no click is in play, a like or unlike is sent that brings it
 *   there: a like that failed under an unlike stacked on it, two tabs that both liked in
 *   one window, a discarded like applied after all.
 * - Who compensates: the tab that holds the browser's intent, on its own ops leaving and on
 *   other tabs' records changing; another tab, on its own ops leaving, only when that tab
 *   is gone (`isTabAlive`). One tab acting on a task, not two, so they cannot both send
 *   what one of them would have.
 *
 * @param {{core: object, sync: object, local?: Storage | null, session?: Storage | null,
 *   newId?: () => string, now?: () => number, isTabAlive?: (tabId: string) => Promise<boolean | undefined>,
 *   withLock?: (name: string, critical: () => unknown) => Promise<unknown>,
 *   later?: (callback: () => void, ms: number) => unknown, onChange?: () => void,
 *   identityPending?: boolean, absorbAfterMs?: number, liveTabs?: () => Promise<string[] | undefined>,
 *   log?: (message: string, error?: unknown) => void}} options
 */
export function createLikes({
  core,
  sync,
  local = null,
  session = null,
  newId = () => crypto.randomUUID(),
  now = Date.now,
  isTabAlive = async () => undefined, // cannot tell
  withLock = async (name, critical) => critical(),
  later = (callback, ms) => setTimeout(callback, ms),
  onChange = () => {},
  identityPending = false,
  absorbAfterMs = ABSORB_AFTER_MS,
  liveTabs = async () => undefined,
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
  // A tab opened as a copy of another (window.open, Duplicate tab) starts with its
  // sessionStorage, this id included, and takes one of its own (`becomeCopy`).
  let tabId = guard(() => session?.getItem(TAB_ID_KEY), null) ?? newId();
  guard(() => session?.setItem(TAB_ID_KEY, tabId));
  let recordKey = `${TAB_RECORD_PREFIX}${tabId}`;
  const legacyLedgerKey = `${LEGACY_LEDGER_PREFIX}${tabId}`;
  let orphansKey = `${ORPHANS_PREFIX}${tabId}`;
  /** Keys of this tab's like ops that another tab took over while this one was away. */
  const givenAway = new Set();

  /**
   * This tab's settled share per task: memory is its truth (only this tab writes it). Its
   * record as stored counts unless an open tab took it in while the page was away.
   */
  const ownRecord = guard(() => local && tabRecords(local).find(([tab]) => tab === tabId)?.[1], undefined);
  const ownShare = new Map(ownRecord?.share ?? []);
  /** The share as this tab's record holds it now: what a tab that takes the record in counts. */
  let storedShare = new Map(ownShare);
  // A ledger this tab kept before the records is taken into its share, once.
  /** Settled while this tab's page (this one or one before it) did not know its id. */
  const unflushed = readContributions(guard(() => session?.getItem(UNFLUSHED_KEY), null));
  for (const [taskId, share] of unflushed) ownShare.set(taskId, (ownShare.get(taskId) ?? 0) + share);
  for (const [taskId, share] of readContributions(guard(() => local?.getItem(legacyLedgerKey), null))) {
    ownShare.set(taskId, (ownShare.get(taskId) ?? 0) + share);
  }
  /** task id -> this tab's clicks still in play, oldest first. */
  const clicks = readClicks(guard(() => session?.getItem(CLICKS_KEY), null));
  /** The tasks this tab's record and clicks had when the page opened. */
  const keptBefore = new Set([...ownShare.keys(), ...clicks.keys()]);
  /** The keys of the compensations this tab sent, to tell their failures apart. */
  const compensations = new Set();
  /** Per task: compensations sent since the user's last click, and failed since the last settle. */
  const sentSinceClick = new Map();
  const failedInARow = new Map();
  /** Per task, after MAX_FAILED_COMPENSATIONS in a row: no compensation before this time. */
  const pausedUntil = new Map();
  /** Every other tab's record, summed: shares, pending deltas, and the latest intents. */
  let others = { share: new Map(), pending: new Map(), intents: new Map() };
  let written = null;
  /**
   * While a change spans several steps (a click, `absorb`): nothing written. While a record
   * is being taken in: that record not read.
   */
  let holding = false;
  const hidden = new Set();
  /** Whether the id is known to be this page's (a copy finds another page holding it). */
  let identified = !identityPending;
  /** When this page was opened: ops and clicks from before it came with a copied session. */
  const openedAt = now();
  /** The share this page came with, and what ops from before it added since: the other page's if this is a copy. */
  const inheritedShare = new Map(ownShare);
  /** Tasks whose compensation waits for the page to know its id. */
  const deferred = new Set();
  /** Whether the page went away (`leave`), and when. */
  let away = false;
  let leftAt = 0;
  const { adoptOrphans, sweep } = createHandover({
    local,
    now,
    later,
    withLock,
    isTabAlive,
    liveTabs,
    absorbAfterMs,
    guard,
    log,
    self: () => ({ id: tabId, orphansKey, ready: identified && !away }),
    outcomesOf: (ops) => sync.outcomesOf(ops),
    takeOrphans: (ops, known) => {
      readOthers(); // they are this tab's pending now, not that tab's
      adopt(ops, known);
    },
    takeIn: absorb,
  });
  writeOwn();
  guard(() => local?.removeItem(legacyLedgerKey)); // now in this tab's record
  readOthers();
  if (identified) {
    takeBackOwn().then(adoptOrphans).then(sweep).catch((error) => log('cannot take back pending likes', error));
  }

  /**
   * What this tab left pending when its page went away (a reload, the back/forward cache)
   * is its own again, unless another tab took it over meanwhile: then it is that tab's to
   * count. So is its record, unless an open tab took it in (`sweep`). With
   * `identifying`, the page learns its id is its own only then: it writes nothing before.
   */
  function takeBackOwn({ identifying = false } = {}) {
    return withLock(ORPHANS_LOCK, async () => {
      reconcileOwn();
      if (identifying) identify();
      const left = readOrphans(guard(() => local?.getItem(orphansKey), null));
      for (const key of left.taken ?? []) givenAway.add(key);
      // Left by another page under this id (the tab this one is a copy of, closed since);
      // a reload's own are in the core already, or have left it (settled meanwhile).
      const strangers = (left.ops ?? []).filter((op) => !core.holds(op.key));
      const known = strangers.length ? await sync.outcomesOf(strangers) : new Map();
      guard(() => local?.removeItem(orphansKey));
      adopt(strangers, known);
      writeOwn();
    });
  }

  /**
   * This tab's record was taken in by an open tab while the page was away (a session
   * restored after `ABSORB_AFTER_MS`): the share it held is counted there, not here.
   */
  function reconcileOwn() {
    const mine = guard(() => local && tabRecords(local).some(([tab]) => tab === tabId), true);
    if (mine || !storedShare.size) return;
    for (const [taskId, share] of storedShare) addToShare(taskId, -share);
    storedShare = new Map();
    written = null;
  }

  /** The page knows its id: it writes its record, and acts on what waited for that. */
  function identify() {
    identified = true;
    written = null;
    writeOwn();
    if (written !== null) {
      unflushed.clear(); // in the record now
      guard(() => session?.removeItem(UNFLUSHED_KEY));
    }
    readOthers();
    for (const taskId of deferred) ownOpLeft(taskId);
    deferred.clear();
  }

  /**
   * Make `ops` this tab's: restored into its core, the unsent sent again (same key). Those
   * `known` to be done (`sync.outcomesOf`, asked before) leave at once: one applied before
   * this page's snapshot has no event to come, and would show twice in the count.
   */
  function adopt(ops, known = new Map()) {
    for (const op of ops) givenAway.delete(op.key);
    core.restore(ops, known);
    for (const op of ops) if (!op.command_id && core.getOp(op.key)) sync.retry(op.key);
  }

  function readOthers() {
    const shares = [];
    const pending = [];
    const intents = [];
    guard(() => {
      if (!local) return;
      for (const [tab, record] of tabRecords(local)) {
        if (tab === tabId || hidden.has(tab)) continue;
        shares.push(record.share);
        pending.push(record.pending);
        intents.push([tab, record.intent]);
      }
      for (let index = 0; index < local.length; index += 1) {
        const key = local.key(index);
        if (key.startsWith(LEGACY_LEDGER_PREFIX)) shares.push(readContributions(local.getItem(key)));
        if (key.startsWith(ORPHANS_PREFIX) && key !== orphansKey) {
          pending.push(sumShares((readOrphans(local.getItem(key)).ops ?? []).map((op) => new Map([[op.task_id, op.delta]]))));
        }
      }
      shares.push(legacyLiked(local.getItem(LEGACY_LIKED_KEY)));
    });
    others = { share: sumShares(shares), pending: sumShares(pending), intents: latestIntents(intents) };
  }

  function ownPending() {
    const pending = new Map();
    for (const op of core.pendingOps()) {
      if (op.kind === 'like' && !givenAway.has(op.key)) pending.set(op.task_id, (pending.get(op.task_id) ?? 0) + op.delta);
    }
    for (const [taskId, delta] of pending) if (delta === 0) pending.delete(taskId);
    return pending;
  }

  function ownIntents() {
    const own = new Map();
    for (const [taskId, list] of clicks) {
      const intent = intentOf(list);
      if (intent) own.set(taskId, [intent.liked, intent.at]);
    }
    return own;
  }

  /**
   * Write this tab's record when it changed. Gone (`leave`), its pending like ops are
   * written as orphans instead, kept up as they settle (a 202 may still come after
   * `pagehide`), and the record says when it left. Not before the page knows the id is its
   * own (`confirmTab`, `becomeCopy`). `absorbing`: the tabs whose records it takes in, whose
   * keys are removed next.
   */
  function writeOwn(absorbing = []) {
    if (!identified || holding) return;
    const ops = core.persistedOps().filter((op) => op.kind === 'like' && !givenAway.has(op.key));
    if (away) guard(() => local?.setItem(orphansKey, JSON.stringify({ ops, at: leftAt })));
    const record = JSON.stringify({
      share: Object.fromEntries(ownShare),
      pending: away ? {} : Object.fromEntries(ownPending()),
      intent: Object.fromEntries(ownIntents()),
      ...(ops.length && !away ? { ops } : {}),
      ...(away ? { left: leftAt } : {}),
      ...(absorbing.length ? { absorbed: absorbing } : {}),
    });
    if (record === written) return;
    if (guard(() => { local?.setItem(recordKey, record); return true; }, false)) {
      written = record;
      storedShare = new Map(ownShare);
    }
  }

  /**
   * A task that is gone and has nothing pending here: its share and clicks are dropped from
   * this tab's record. Gone: its delete seen (a tombstone), or, with `absent`, missing from
   * the first snapshot while the record or the clicks had it before (that snapshot is newer
   * than them). Not merely missing from the view: a view can be behind another tab's, whose
   * record this one took in. Returns whether any was.
   */
  function pruneGone({ absent = false } = {}) {
    const busy = new Set(core.pendingOps().map((op) => op.task_id));
    let pruned = false;
    for (const taskId of new Set([...ownShare.keys(), ...clicks.keys()])) {
      if (busy.has(taskId)) continue;
      if (!core.isDeleted(taskId) && !(absent && keptBefore.has(taskId) && !core.confirmedTask(taskId))) continue;
      ownShare.delete(taskId);
      clicks.delete(taskId);
      pruned = true;
    }
    if (pruned) writeClicks();
    return pruned;
  }

  function writeClicks() {
    while (clicks.size > MAX_CLICKED_TASKS) clicks.delete(clicks.keys().next().value);
    guard(() => session?.setItem(CLICKS_KEY, JSON.stringify([...clicks])));
  }

  function setClicks(taskId, list) {
    clicks.delete(taskId); // re-inserted last: the most recently touched task goes last
    if (list.length) clicks.set(taskId, list);
  }

  function addToShare(taskId, delta) {
    const next = (ownShare.get(taskId) ?? 0) + delta;
    if (next === 0) ownShare.delete(taskId);
    else ownShare.set(taskId, next);
  }

  /** This browser's settled share of a task: every tab's. */
  function share(taskId) {
    return (ownShare.get(taskId) ?? 0) + (others.share.get(taskId) ?? 0);
  }

  /** The browser's intent on a task: the latest click of any tab still in play. */
  function intent(taskId) {
    const own = intentOf(clicks.get(taskId) ?? []);
    const theirs = others.intents.get(taskId);
    if (own && isLaterThan({ at: own.at, tab: tabId }, theirs)) {
      return { liked: own.liked, at: own.at, tab: tabId };
    }
    return theirs;
  }

  /** This tab's pending like deltas on a task. */
  function pendingOn(taskId) {
    return ownPending().get(taskId) ?? 0;
  }

  /**
   * Whether the toggle shows Liked: the browser's share and this tab's pending deltas, as
   * the count beside it adds this tab's pending deltas to the server's. Another tab's
   * pending like shows here once it settles; a click here meanwhile likes too, and the
   * compensation, which does count every tab's pending deltas, brings it back to one.
   */
  function liked(taskId, ownPendingOnTask) {
    return isLiked(share(taskId), ownPendingOnTask);
  }

  /** Send what brings the eventual share to what the intent asks, within the bounds. */
  function compensate(taskId) {
    if (!identified) {
      deferred.add(taskId);
      return;
    }
    if (core.isDeleted(taskId) || !core.confirmedTask(taskId)) return;
    if ((failedInARow.get(taskId) ?? 0) >= MAX_FAILED_COMPENSATIONS && now() < (pausedUntil.get(taskId) ?? 0)) return;
    const pending = pendingOn(taskId) + (others.pending.get(taskId) ?? 0);
    const delta = compensation(share(taskId), pending, intent(taskId)?.liked);
    const sent = sentSinceClick.get(taskId) ?? 0;
    const count = Math.min(Math.abs(delta), MAX_COMPENSATIONS_PER_CLICK - sent);
    if (count <= 0) return;
    sentSinceClick.set(taskId, sent + count);
    for (let index = 0; index < count; index += 1) {
      compensations.add(sync.like(taskId, Math.sign(delta), undefined, { compensating: true }).key);
    }
  }

  /** No compensation on the task for a while, then one more try (`COMPENSATION_PAUSES_MS`). */
  function pauseCompensations(taskId, failures) {
    const steps = COMPENSATION_PAUSES_MS.length;
    const pause = COMPENSATION_PAUSES_MS[Math.min(failures - MAX_FAILED_COMPENSATIONS, steps - 1)];
    pausedUntil.set(taskId, now() + pause);
    later(() => {
      if (failedInARow.get(taskId) !== failures) return; // moved on since
      if (!away) endPause(taskId); // else when the page is back (`resume`)
    }, pause);
  }

  /** A pause is over: one more try. */
  function endPause(taskId) {
    pausedUntil.delete(taskId);
    ownOpLeft(taskId);
  }

  /**
   * After an op of ours on the task left (or on start): this tab acts if it holds the
   * intent, or its holder is gone, or no tab holds one.
   */
  function ownOpLeft(taskId) {
    const holder = intent(taskId)?.tab;
    if (holder === undefined || holder === tabId) return compensate(taskId);
    isTabAlive(holder).then((alive) => {
      if (!alive && intent(taskId)?.tab === holder) compensate(taskId);
    }, (error) => log('cannot tell whether a tab is open', error));
    return undefined;
  }

  /**
   * Once the first snapshot is in: a task whose share this tab (or a tab now closed)
   * should bring to the intent gets what it needs. After a reload, compensations that
   * paused after failing in a row go on at once.
   */
  let checkedOnStart = false;
  function checkOnStart() {
    if (checkedOnStart || !core.getSnapshot().loaded) return;
    checkedOnStart = true;
    pruneGone({ absent: true });
    for (const taskId of new Set([...clicks.keys(), ...others.intents.keys()])) ownOpLeft(taskId);
  }

  /**
   * Under the orphans' lock, which a tab coming back takes before it writes (`takeBackOwn`).
   * `crashed`: the tab went without `pagehide`, its pending like ops are in its record.
   */
  async function absorb(tab, { crashed = false } = {}) {
    const ops = guard(() => tabRecords(local).find(([id]) => id === tab)?.[1].ops, undefined) ?? [];
    const known = ops.length ? await sync.outcomesOf(ops) : new Map();
    const record = guard(() => tabRecords(local).find(([id]) => id === tab)?.[1], undefined);
    // Taken in already, or back since (a closed tab's record has `left`, an open one's not).
    if (!record || (record.left === null) !== crashed || away) return;
    const orphansKey = `${ORPHANS_PREFIX}${tab}`;
    const orphans = readOrphans(guard(() => local.getItem(orphansKey), null));
    if (orphans.ops?.length) return;
    const pending = sumShares(record.ops.map((op) => new Map([[op.task_id, op.delta]])));
    // Pending deltas without their ops (a record from before they were kept): unknown.
    if (differing(pending, record.pending).length) return;
    // From here this tab counts what that record held, and nothing is written until it
    // all is: the ops taken over settle in this tab's core as they are restored, and its
    // compensations must see the shares and intents already moved.
    holding = true;
    try {
      for (const [taskId, share] of record.share) addToShare(taskId, share);
      for (const [taskId, [liked, at]] of record.intent) {
        const list = clicks.get(taskId) ?? [];
        const own = intentOf(list);
        if (isLaterThan({ at, tab }, own && { at: own.at, tab: tabId })) setClicks(taskId, [...list, { key: null, liked, at }]);
      }
      hidden.add(tab);
      readOthers();
      if (record.ops.length) {
        const taken = [...(orphans.taken ?? []), ...record.ops.map((op) => op.key)];
        guard(() => local.setItem(orphansKey, JSON.stringify({ taken, at: now() })));
        adopt(record.ops, known);
      }
    } finally {
      holding = false;
    }
    writeClicks();
    pruneGone();
    // Counted here and that record hidden from every reader, before it goes. So are the ones
    // it was taking in itself when its page went (their shares are in it).
    const absorbing = [tab, ...record.absorbed];
    writeOwn(absorbing);
    for (const id of absorbing) guard(() => local.removeItem(`${TAB_RECORD_PREFIX}${id}`));
    hidden.delete(tab);
    writeOwn(); // no longer hiding the id: its tab, reopened, writes under it again
    readOthers();
  }

  const unsubscribe = core.subscribe(() => {
    const touched = new Set();
    let clicksChanged = false;
    for (const { op, outcome, reason } of core.takeDeparted()) {
      if (op.kind !== 'like' || givenAway.delete(op.key)) continue;
      const list = clicks.get(op.task_id);
      if (outcome === 'settled' || outcome === 'applied_late') {
        addToShare(op.task_id, op.delta);
        if (!identified) {
          if (op.issued_at < openedAt) inheritedShare.set(op.task_id, (inheritedShare.get(op.task_id) ?? 0) + op.delta);
          // No record is written yet: kept for the tab's next page, should this one go first.
          unflushed.set(op.task_id, (unflushed.get(op.task_id) ?? 0) + op.delta);
          guard(() => session?.setItem(UNFLUSHED_KEY, JSON.stringify(Object.fromEntries(unflushed))));
        }
        failedInARow.delete(op.task_id);
        pausedUntil.delete(op.task_id);
        // Something the user did not do now: a fresh allowance to make up for it.
        if (outcome === 'applied_late') sentSinceClick.delete(op.task_id);
      } else if (compensations.has(op.key) && reason !== 'not_found') {
        const failures = (failedInARow.get(op.task_id) ?? 0) + 1;
        failedInARow.set(op.task_id, failures);
        if (failures >= MAX_FAILED_COMPENSATIONS) pauseCompensations(op.task_id, failures);
      }
      compensations.delete(op.key);
      if (list && outcome === 'settled') setClicks(op.task_id, clickSettled(list, op.key));
      else if (list && outcome !== 'applied_late') setClicks(op.task_id, clickWithdrawn(list, op.key));
      clicksChanged ||= Boolean(list);
      // Settled too: another tab of this browser may have liked in the same window, which
      // leaves the share at 2.
      if (reason !== 'not_found') touched.add(op.task_id);
    }
    if (clicksChanged) writeClicks();
    for (const taskId of touched) ownOpLeft(taskId);
    checkOnStart(); // after the departures: the ops a snapshot settled are in the share
    pruneGone();
    writeOwn(); // after the compensations: they are pending too
    // A share can move with no item changing (an op taken over settles as it comes in).
    if (touched.size) onChange();
  });

  checkOnStart();

  return {
    get tabId() {
      return tabId;
    },
    /**
     * Another open page holds this tab's id: this page was opened as a copy of it and
     * came with its sessionStorage. It takes an id, a share and clicks of its own; the like
     * ops it restored are the other page's to count.
     */
    becomeCopy() {
      // What came with the copied session is the other page's; what was done here since is this one's.
      for (const op of core.pendingOps()) if (op.kind === 'like' && op.issued_at < openedAt) givenAway.add(op.key);
      for (const [taskId, list] of [...clicks]) setClicks(taskId, list.filter((click) => click.at >= openedAt));
      tabId = newId();
      guard(() => session?.setItem(TAB_ID_KEY, tabId));
      recordKey = `${TAB_RECORD_PREFIX}${tabId}`;
      orphansKey = `${ORPHANS_PREFIX}${tabId}`;
      for (const [taskId, share] of inheritedShare) addToShare(taskId, -share);
      storedShare = new Map(); // no record under the new id yet
      writeClicks();
      identify();
      onChange();
      adoptOrphans().then(sweep).catch((error) => log('cannot take over pending likes', error));
      return tabId;
    },
    /** This page holds its tab's lock: the id is its own (what it left before a reload included). */
    confirmTab() {
      return takeBackOwn({ identifying: true }).then(adoptOrphans).then(sweep);
    },
    /** Whether the toggle shows Liked, with this tab's `pending` deltas on the task. */
    isLiked: liked,
    /** A click: the delta that flips the toggle as shown, recorded as this tab's intent. */
    toggle(taskId) {
      const delta = toggleDelta(share(taskId), pendingOn(taskId));
      const wanted = delta > 0;
      // One write with the op and the click: a record with the op's delta and the intent
      // before it would make the tab holding that intent undo the click.
      holding = true;
      let op;
      try {
        op = sync.like(taskId, delta);
      } finally {
        holding = false;
      }
      sentSinceClick.delete(taskId);
      failedInARow.delete(taskId);
      pausedUntil.delete(taskId);
      setClicks(taskId, [...(clicks.get(taskId) ?? []), { key: op.key, liked: wanted, at: now() }]);
      writeClicks();
      writeOwn();
      return op;
    },
    /**
     * Another tab wrote `key` (a `storage` event; `null` when storage was cleared).
     * Returns whether anything the toggles show may have changed. The tab that holds the
     * browser's intent on a task whose share, pending deltas or intent moved brings it
     * where it should be.
     */
    storageChanged(key) {
      if (key !== null && !key.startsWith(TAB_RECORD_PREFIX) && !key.startsWith(LEGACY_LEDGER_PREFIX)
        && !key.startsWith(ORPHANS_PREFIX) && key !== LEGACY_LIKED_KEY) return false;
      if (key === null || key.startsWith(ORPHANS_PREFIX)) adoptOrphans().catch((error) => log('cannot take over pending likes', error));
      // A tab that left: taken in once it has been gone long enough.
      if (key?.startsWith(TAB_RECORD_PREFIX) && readTabRecord(guard(() => local?.getItem(key), null)).left !== null) {
        sweep().catch((error) => log('cannot take in the records of closed tabs', error));
      }
      const before = others;
      readOthers();
      const moved = new Set([
        ...differing(before.share, others.share),
        ...differing(before.pending, others.pending),
        ...differing(before.intents, others.intents),
      ]);
      for (const taskId of moved) if (intent(taskId)?.tab === tabId) compensate(taskId);
      return true;
    },
    /** Look now for the records of tabs gone (like-handover.js looks every minute too). */
    sweep: () => sweep(),
    /** The page goes away: its pending deltas stop counting for the other tabs. */
    leave() {
      away = true;
      leftAt = now();
      writeOwn();
    },
    /** The page is back (from the back/forward cache): its pending deltas are its own again. */
    resume() {
      away = false;
      takeBackOwn().then(() => {
        for (const [taskId, until] of pausedUntil) if (until <= now()) endPause(taskId);
      }).catch((error) => log('cannot take back pending likes', error));
    },
    stop: unsubscribe,
  };
}
