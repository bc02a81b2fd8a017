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
// after all, at +2). After an op of ours leaves without applying, `compensation` says
// which delta brings the browser's eventual share back to 0 or 1; the tab sends it as a
// new like or unlike. No DOM, no storage: unit-tested with `node --test`.

/** Whether this browser likes the task, its pending deltas included. */
export function isLiked(contribution, pending) {
  return contribution + pending > 0;
}

/** The delta a click on the toggle sends. */
export function toggleDelta(contribution, pending) {
  return isLiked(contribution, pending) ? -1 : 1;
}

/**
 * The delta that brings this browser's eventual share (settled + pending) back to 0 or
 * 1, or 0 when it is there: +1 from -1, -1 from 2, and so on.
 */
export function compensation(contribution, pending) {
  const eventual = contribution + pending;
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
  try {
    const parsed = JSON.parse(stored ?? '{}');
    if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) return new Map();
    return new Map(Object.entries(parsed).filter(([, value]) => Number.isInteger(value) && value !== 0));
  } catch {
    return new Map();
  }
}
