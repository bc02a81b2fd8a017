// The notices the page shows: why an op failed, was refused or discarded, or applied after
// the user stopped waiting for it. Kept until dismissed, the newest last; the texts come
// from ops.js (`noticeOf`). Time comes from the injected `now()`.

/**
 * How many notices are kept until dismissed; past it the oldest drop off. Enough that
 * a burst of failures leaves each on screen to be read (the view scrolls them).
 */
const MAX_NOTICES = 50;

/** @param {{now: () => number}} options */
export function createNotices({ now }) {
  /** Frozen notices, oldest first: a new array on each change, for the snapshot. */
  let list = [];
  let nextId = 1;

  /** Replace the list when `keep` leaves something out. @returns {boolean} whether it did */
  function keepOnly(keep) {
    const rest = list.filter(keep);
    if (rest.length === list.length) return false;
    list = rest;
    return true;
  }

  return {
    get list() {
      return list;
    },
    add(notice) {
      list = [...list, Object.freeze({ id: nextId++, at: now(), ...notice })].slice(-MAX_NOTICES);
    },
    /** Dismiss the notice `id`, or every notice when `id` is omitted. @returns {boolean} */
    dismiss(id) {
      return keepOnly((notice) => id !== undefined && notice.id !== id);
    },
    /** A conflict on the task was resolved: its notice has nothing left to tell. @returns {boolean} */
    dropConflict(taskId) {
      return keepOnly((notice) => notice.task_id !== taskId
        || (notice.reason !== 'conflict' && notice.reason !== 'kept_moving'));
    },
  };
}
