// What the core remembers of ops once they left their stacks (core.js):
// - how each left, until the view takes it (`takeDeparted`: the like toggle reads it);
// - which keys left here, so that a reload's copy of one is never put back;
// - the outcomes of recent events that matched no op of this tab, so that an op taken
//   over from a tab that closed, whose event came first, is done at once;
// - the ops the user stopped waiting for (Discard), so that an apply after all says so
//   instead of passing for someone else's change.
// The keys, outcomes and discarded ops kept are bounded, the oldest dropping off (a
// restore puts back whatever was saved); how ops left is kept until taken.
//
// Pure: no DOM, no fetch, no timers.

import { isSavedOp } from './ops.js';

/** How many outcomes of events that matched no op are remembered. */
const MAX_UNMATCHED = 500;
/** How many keys of ops that left their stacks are remembered. */
const MAX_LEFT = 1000;
/** How many discarded ops are remembered, to tell when one is applied after all. */
const MAX_DISCARDED = 100;

/** Add `key -> value` to an insertion-ordered map, dropping the oldest past `max`. */
function remember(map, key, value, max) {
  map.set(key, value);
  if (map.size > max) map.delete(map.keys().next().value);
}

export function createDepartures() {
  /** How ops left since the last `takeDeparted`: `{op, outcome, reason?}`, in order. */
  let departed = [];
  /** Keys of the ops that left their stacks here (the last MAX_LEFT). */
  const left = new Set();
  /** Idempotency key -> `{type, reason}` of a recent event that matched no op here. */
  const unmatchedOutcomes = new Map();
  /** Idempotency key -> op the user stopped waiting for, newest last. */
  const discardedOps = new Map();

  return {
    /** Note how `op` left, or was done before it could be put back. */
    depart(op, outcome, reason) {
      departed = [...departed, Object.freeze({ op, outcome, reason })];
      left.add(op.key);
      if (left.size > MAX_LEFT) left.delete(left.values().next().value);
    },

    /**
     * How ops left since the last call, in order: `{op, outcome, reason?}` with outcome
     * `settled`, `failed` (and its reason), `rejected` or `discarded`, or `applied_late`
     * for a discarded op whose settled event came after all.
     */
    takeDeparted() {
      const taken = departed;
      departed = [];
      return taken;
    },

    /** Whether the op of this key left its stack here (it is never put back). */
    hasLeft: (key) => left.has(key),

    /** An event of type `type` matched no op here. */
    noteUnmatched(key, type, reason) {
      remember(unmatchedOutcomes, key, Object.freeze({ type, reason }), MAX_UNMATCHED);
    },

    /** The `{type, reason}` of the event under `key` that matched no op here, if one came. */
    outcomeOf: (key) => unmatchedOutcomes.get(key),

    /** The user stopped waiting for `op` (as it was titled then). */
    noteDiscarded(op, titleThen) {
      remember(discardedOps, op.key, Object.freeze({ ...op, title_then: titleThen }), MAX_DISCARDED);
    },

    /** A discarded op's 202 came: its status can be asked after a reload. */
    discardedAccepted(key, commandId) {
      const gone = discardedOps.get(key);
      if (gone) discardedOps.set(key, Object.freeze({ ...gone, command_id: commandId }));
    },

    /** The discarded op of `key`, forgotten now that its outcome came (null if none). */
    takeDiscarded(key) {
      const op = discardedOps.get(key) ?? null;
      if (op) discardedOps.delete(key);
      return op;
    },

    /** The discarded ops still remembered, in the shape `restoreDiscarded` takes back. */
    persistedDiscarded: () => [...discardedOps.values()],

    /** Put back discarded ops persisted before a reload, so a late apply is told still. */
    restoreDiscarded(saved) {
      for (const op of saved) {
        if (isSavedOp(op) && !discardedOps.has(op.key)) discardedOps.set(op.key, Object.freeze({ ...op }));
      }
    },
  };
}
