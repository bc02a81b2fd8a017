// How the core's state reaches its readers: one immutable snapshot, the same object until
// something changes (the contract of React's useSyncExternalStore), its listeners told
// of each change. An item is built again only when its inputs changed, so an unchanged
// task keeps its identity across snapshots and the view leaves its DOM node alone. The
// sync indicator's figures (ops older than `syncMs`) are kept here too: they change with
// time as well as with the ops, and a tick recounts them.
//
// No DOM, no timers: the core calls in with its state and the time.

import { itemOf } from './ops.js';

const NO_SYNC = Object.freeze({ count: 0, oldest_issued_at: null });

/**
 * @param {{syncMs: number}} options `syncMs`: age since issue after which an op lights
 *   the sync indicator
 */
export function createPublisher({ syncMs }) {
  const listeners = new Set();
  let snapshot = null;
  /** Task id -> the inputs its item was built from, and the item. */
  const itemMemo = new Map();
  /** Ops older than syncMs, as of the last count: what the sync indicator shows. */
  let sync = NO_SYNC;

  /**
   * Recount the ops older than syncMs at `at`.
   * @param {Iterable<{issued_at: number}>} ops every pending op
   * @returns {boolean} whether the figures moved
   */
  function recountSync(ops, at) {
    let count = 0;
    let oldest = null;
    for (const op of ops) {
      // Issued well "after" now: the clock was set back, and how long it has waited is
      // not known. It is counted, rather than left out until the clock comes back (a
      // step of less than syncMs, such as NTP's, is only a moment's difference).
      if (at - op.issued_at >= syncMs || op.issued_at - at > syncMs) {
        count += 1;
        if (oldest === null || op.issued_at < oldest) oldest = op.issued_at;
      }
    }
    if (count === sync.count && oldest === sync.oldest_issued_at) return false;
    sync = Object.freeze({ count, oldest_issued_at: oldest });
    return true;
  }

  /** Drop the snapshot and tell the listeners (the sync figures as last counted). */
  function publish() {
    snapshot = null;
    for (const listener of [...listeners]) listener();
  }

  /** The state changed: recount the sync figures, then `publish`. */
  function changed(ops, at) {
    recountSync(ops, at);
    publish();
  }

  function itemFor(id, confirmed, ops, conflict) {
    const memo = itemMemo.get(id);
    if (memo && memo.confirmed === confirmed && memo.ops === ops && memo.conflict === conflict) return memo.item;
    const item = itemOf(id, confirmed, ops, conflict);
    itemMemo.set(id, { confirmed, ops, conflict, item });
    return item;
  }

  /**
   * The snapshot, built from `read()` when something changed since the last one.
   * @param {() => {order: string[], base: Map<string, object>, pending: object,
   *   conflicts: Map<string, object>, fields: object}} read the core's state now; `fields`
   *   go into the snapshot as they are
   */
  function getSnapshot(read) {
    if (snapshot) return snapshot;
    const { order, base, pending, conflicts, fields } = read();
    const items = [];
    for (const id of order) {
      const item = itemFor(id, base.get(id) ?? null, pending.of(id), conflicts.get(id) ?? null);
      if (item) items.push(item);
    }
    for (const id of itemMemo.keys()) if (!base.has(id) && !pending.has(id) && !conflicts.has(id)) itemMemo.delete(id);
    snapshot = Object.freeze({ items: Object.freeze(items), sync, ...fields });
    return snapshot;
  }

  function subscribe(listener) {
    listeners.add(listener);
    return () => listeners.delete(listener);
  }

  return { changed, publish, recountSync, getSnapshot, subscribe };
}
