// Conflicts: an edit or a delete made on a version of a task that moved before it applied.
//
// An edit records the values it was made on (`seenValues`), with the version (`made_on`). When
// the server refuses it as a conflict, one of two things happened:
// - nobody else's edit explains it: every field it sets still holds a value the user was
//   shown (a like moved the version, say). It is sent again on the current version
//   (`rebasePlan`), and the user is not asked;
// - someone else changed what it sets: the user decides (`conflictOf`), shown theirs as
//   the task is now (`refreshedConflict`).
//
// Pure but for the book of open conflicts (`createConflictBook`), which the core (core.js)
// holds beside the stacks of ops.

import { applyOp } from './ops.js';

/**
 * The fields an edit sets, whose values an edit or a delete was made on are recorded
 * (see `seenValues`): someone else's change to one of them is what a conflict is about.
 */
export const EDIT_FIELDS = Object.freeze(['title', 'notes', 'done']);
/**
 * How many times one edit is re-sent by itself on a newer version (see `rebasePlan`) before
 * the conflict is put to the user: versions that keep moving (likes, say) cannot hold it
 * forever.
 */
const MAX_REBASES = 5;

/**
 * For each field an edit may set, every value the user could have been shown: the
 * confirmed one and the ones our own pending ops (`ops`, the task's stack) predict on top
 * of it. An edit records them with the version it was made on (`made_on`).
 */
export function seenValues(confirmed, ops) {
  const seen = {};
  for (const field of EDIT_FIELDS) {
    const values = confirmed ? [confirmed[field]] : [];
    for (const op of ops) {
      if (op.kind === 'update' && field in op.patch) values.push(op.patch[field]);
      else if (op.kind === 'create') values.push(applyOp(null, op)[field]);
    }
    seen[field] = Object.freeze([...new Set(values)]);
  }
  return Object.freeze(seen);
}

/**
 * What becomes of an edit or a delete refused as a conflict, with the task now `theirs`
 * and `later` our ops stacked after it.
 *
 * When nobody else's edit explains the refusal (every field it sets, a delete every field,
 * still holds a value the user was shown), the version moved for another reason (a like,
 * someone's change to another field, or our own op before it that failed): it is sent
 * again, by itself, on the current version, a new command under a new key, as Keep mine
 * would send. Fields a later edit of ours sets anyway are left out (the server would apply
 * this one last), and an edit left with none is dropped. After MAX_REBASES re-sends the
 * user decides, told that the task kept changing, not that someone changed what they edited.
 * @returns {{fate: 'resent', fields: string[]} | {fate: 'kept_moving'} | null} `fields`: what
 *   the re-sent edit sets (none: drop it); null: someone else changed what it sets
 */
export function rebasePlan(op, theirs, later) {
  if (!op.seen || !theirs || (op.kind !== 'update' && op.kind !== 'delete')) return null;
  const fields = op.kind === 'update' ? Object.keys(op.patch) : EDIT_FIELDS;
  if (!fields.every((field) => op.seen[field]?.includes(theirs[field]))) return null;
  if ((op.rebased ?? 0) >= MAX_REBASES) return { fate: 'kept_moving' };
  const superseded = (field) => later.some((next) => next.kind === 'update' && field in next.patch);
  return { fate: 'resent', fields: op.kind === 'update' ? fields.filter((field) => !superseded(field)) : [...fields] };
}

/**
 * The open conflict of a refused edit or delete, for the user to decide: theirs as the
 * task is, and which fields someone else changed that the user had not seen.
 * `keptMoving`: nobody changed what it sets, the version kept moving under it (`rebasePlan`).
 */
export function conflictOf(op, theirs, keptMoving) {
  return Object.freeze({
    task_id: op.task_id,
    kind: op.kind,
    yours: Object.freeze(op.kind === 'update' ? { ...op.patch } : { deleted: true }),
    theirs: Object.freeze({ ...theirs }),
    // What someone else changed that the user had not seen (all fields, unknown).
    changed: Object.freeze(EDIT_FIELDS.filter((field) => !op.seen?.[field]?.includes(theirs[field]))),
    kept_moving: keptMoving,
  });
}

/**
 * An open conflict shows theirs as the task is now (`current`): Keep mine is made on the
 * current version, so the view must show what it would replace (a later change by someone
 * else included, among the fields they changed). The same conflict when nothing moved.
 */
export function refreshedConflict(conflict, current) {
  if (!current || current.version <= (conflict.theirs.version ?? 0)) return conflict;
  const moved = EDIT_FIELDS.filter((field) => current[field] !== conflict.theirs[field]);
  return Object.freeze({
    ...conflict,
    theirs: Object.freeze({ ...current }),
    changed: Object.freeze([...new Set([...conflict.changed, ...moved])]),
  });
}

/**
 * A conflict stored before a reload, frozen again; null when it is not one. Read
 * leniently, as storage may hold what an older build or a hand wrote.
 */
export function revivedConflict(saved) {
  if (!saved?.task_id || !saved.yours || !saved.theirs) return null;
  return Object.freeze({
    ...saved,
    yours: Object.freeze({ ...saved.yours }),
    theirs: Object.freeze({ ...saved.theirs }),
    changed: Object.freeze(Array.isArray(saved.changed) ? saved.changed.filter((field) => typeof field === 'string') : []),
  });
}

/**
 * The open conflicts, one per task at most: a refused edit that waits for the user's
 * choice, with theirs kept as the task is now (`refresh`). The core holds one.
 */
export function createConflictBook() {
  /** Task id -> open conflict (frozen). */
  const open = new Map();
  return {
    /** Task id -> open conflict, for the view's snapshot. */
    byTask: open,
    open: (conflict) => open.set(conflict.task_id, conflict),
    /** @returns {object | undefined} the conflict closed */
    close(taskId) {
      const conflict = open.get(taskId);
      open.delete(taskId);
      return conflict;
    },
    /** Theirs as the task is now (`current`: the confirmed task; `refreshedConflict`). */
    refresh(taskId, current) {
      const conflict = open.get(taskId);
      if (conflict) open.set(taskId, refreshedConflict(conflict, current));
    },
    /** The open conflicts, in the shape `restore` takes back after a reload. */
    persisted: () => [...open.values()],
    /**
     * Put back conflicts persisted before a reload: a refused edit waits for the user still.
     * @returns {boolean} whether any came back
     */
    restore(saved) {
      let restored = false;
      for (const stored of saved) {
        const conflict = revivedConflict(stored);
        if (!conflict || open.has(conflict.task_id)) continue;
        open.set(conflict.task_id, conflict);
        restored = true;
      }
      return restored;
    },
  };
}
