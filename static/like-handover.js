// Who takes over what the closed tabs of a browser left, and when (static/likes.js does
// the taking): the like ops a tab left pending when its page went away (orphans), and the
// records of tabs gone, closed a while ago or crashed, so that they do not pile up. One
// open tab acts: the one with the least id among the open tabs, as the lock manager lists
// them. The others keep looking, in case it closes first.

import {
  ORPHANS_PREFIX, ORPHANS_LOCK, ADOPT_AFTER_MS, SWEEP_EVERY_MS, KEEP_TAKEN_MS, readOrphans, tabRecords,
} from './like-records.js';

/**
 * @param {{local: Storage | null, now: () => number, later: (callback: () => void, ms: number) => unknown,
 *   withLock: (name: string, critical: () => unknown) => Promise<unknown>,
 *   isTabAlive: (tabId: string) => Promise<boolean | undefined>, liveTabs: () => Promise<string[] | undefined>,
 *   absorbAfterMs: number, guard: (what: () => unknown, fallback: unknown) => unknown,
 *   log: (message: string, error?: unknown) => void,
 *   self: () => {id: string, orphansKey: string, ready: boolean},
 *   outcomesOf: (ops: object[]) => Promise<Map<string, object>>,
 *   takeOrphans: (ops: object[], known: Map<string, object>) => void,
 *   takeIn: (tabId: string, options?: {crashed?: boolean}) => Promise<void>}} options
 *   `self`: this tab's id, its orphans' key, and whether it may act (it knows its id and is
 *   not going away). `outcomesOf`: which ops are done, asked of the server. `takeOrphans`:
 *   make ops this tab's (under the orphans' lock, marked taken), those known done leaving
 *   at once. `takeIn`: take a tab's record in (under the lock; it checks the record again).
 */
export function createHandover({
  local, now, later, withLock, isTabAlive, liveTabs, absorbAfterMs, guard, log, self, outcomesOf, takeOrphans, takeIn,
}) {
  /**
   * Whether this tab is the one that takes over what closed tabs left: of the open tabs (as
   * the lock manager lists them), the one with the least id. A Web Lock alone would not
   * do: the tab that takes it next may not see yet what the one before wrote in
   * localStorage, and take in the same record again. With no list (no Web Locks), every tab.
   */
  async function elected() {
    return isLeast(await liveTabs());
  }

  /** Whether this tab has the least id of `live` (the open tabs' ids, or undefined: cannot tell). */
  function isLeast(live) {
    return !live || live.every((id) => id >= self().id);
  }

  /**
   * The records of other tabs that are gone, taken in so that they do not pile up (one per
   * tab ever opened): their shares added to this tab's, their intents this tab's where
   * later than its own, their keys removed.
   * - A tab closed (its record has `left`) more than `absorbAfterMs` ago. Not one that left
   *   pending likes: `adoptOrphans` takes those over first.
   * - A tab gone without `pagehide` (a crash, a kill, a tab the browser discarded): no
   *   `left`, and its lock found free twice, `ADOPT_AFTER_MS` apart. Its pending like ops
   *   are taken over too (they may still apply), and marked taken, as orphans are, for the
   *   tab reopened with its session. Not when locks cannot tell (`isTabAlive` not false).
   * Looked for on start, when a record changes, and every `SWEEP_EVERY_MS` (a crash
   * writes nothing).
   */
  let sweepScheduledAt = Infinity;
  /** Tab id -> when its lock was first found free with its record saying it is open. */
  const suspects = new Map();
  async function sweep() {
    if (!self().ready || !local) return;
    const closed = [];
    const crashed = [];
    let next = SWEEP_EVERY_MS;
    const live = await liveTabs(); // one look at the lock manager for every record
    for (const [tab, record] of guard(() => tabRecords(local), [])) {
      if (tab === self().id) continue;
      if (record.left !== null) {
        const age = now() - record.left;
        if (age >= absorbAfterMs) closed.push(tab);
        else next = Math.min(next, absorbAfterMs - age);
        continue;
      }
      if ((live ? live.includes(tab) : await isTabAlive(tab)) !== false) {
        suspects.delete(tab);
        continue;
      }
      if (!suspects.has(tab)) suspects.set(tab, now());
      const free = now() - suspects.get(tab);
      if (free >= ADOPT_AFTER_MS) crashed.push(tab);
      else next = Math.min(next, ADOPT_AFTER_MS - free);
    }
    // One timer at a time, for the earliest look due.
    if (now() + next < sweepScheduledAt) {
      const at = now() + next;
      sweepScheduledAt = at;
      later(() => {
        if (sweepScheduledAt === at) sweepScheduledAt = Infinity;
        sweep().catch((error) => log('cannot take in the records of closed tabs', error));
      }, next);
    }
    // Another open tab takes them in; this one keeps looking, in case that tab closes first.
    if (!isLeast(live)) return;
    for (const tab of closed) {
      if (!(await isTabAlive(tab))) await withLock(ORPHANS_LOCK, () => takeIn(tab));
    }
    for (const tab of crashed) {
      await withLock(ORPHANS_LOCK, async () => {
        if ((await isTabAlive(tab)) === false) await takeIn(tab, { crashed: true });
      });
      suspects.delete(tab);
    }
  }

  /**
   * Take over the like ops of tabs that went away and did not come back: they may still
   * apply, and this browser's share must count them. Each is restored into this tab's
   * core (one that never had its 202 is sent again, same key), by one tab (`elected`),
   * under a Web Lock.
   */
  let adoptScheduled = false;
  function lookAgain(ms) {
    if (adoptScheduled) return;
    adoptScheduled = true;
    later(() => {
      adoptScheduled = false;
      adoptOrphans().then(sweep).catch((error) => log('cannot take over pending likes', error));
    }, ms);
  }
  async function adoptOrphans() {
    const keys = [];
    guard(() => {
      for (let index = 0; index < (local?.length ?? 0); index += 1) {
        const key = local.key(index);
        if (key.startsWith(ORPHANS_PREFIX) && key !== self().orphansKey) keys.push(key);
      }
    });
    for (const key of keys) {
      const left = readOrphans(guard(() => local.getItem(key), null));
      const age = now() - left.at;
      if (left.taken || !left.ops.length) {
        if (age > KEEP_TAKEN_MS || (!left.taken && age > ADOPT_AFTER_MS)) guard(() => local.removeItem(key));
        continue;
      }
      if (age < ADOPT_AFTER_MS) {
        // Its tab may be reloading: look again once it has had the time to take them back.
        lookAgain(ADOPT_AFTER_MS - age);
        continue;
      }
      if (await isTabAlive(key.slice(ORPHANS_PREFIX.length))) continue;
      if (!(await elected())) {
        lookAgain(ADOPT_AFTER_MS); // another open tab takes them over, unless it closes first
        continue;
      }
      await withLock(ORPHANS_LOCK, async () => {
        const left = readOrphans(guard(() => local.getItem(key), null)).ops;
        if (!left?.length) return;
        const known = await outcomesOf(left);
        // Read again: a 202 that came after its page left may have given one its command id.
        const { ops } = readOrphans(guard(() => local.getItem(key), null));
        if (!ops?.length) return;
        guard(() => local.setItem(key, JSON.stringify({ taken: ops.map((op) => op.key), at: now() })));
        takeOrphans(ops, known);
      });
    }
  }

  return { adoptOrphans, sweep };
}
