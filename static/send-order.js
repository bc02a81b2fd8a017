// When an edit or a delete goes out, and on which version (the core's outbox).
//
// The server applies a task's commands in the order it took them, and refuses a stale
// `base_version` as a conflict. So an edit made while an op of ours on the task is still
// pending is queued: it goes out once every op ahead of it has settled or failed, on the
// version the task then has by the user's own doing (`baseFor`). Counted ahead of time,
// an op of ours that then failed while someone else's change applied would make the
// count come out right, and the edit would replace a change the user never saw.
//
// Pure: no DOM, no fetch, no timers. The core (core.js) calls it as ops come and go, and
// the sync engine takes what is due (`takeOutbox`).

/** How many versions of a task's own settled changes are remembered (`baseFor`). */
const MAX_OWN_VERSIONS = 32;

/**
 * @param {{pending: object, now: () => number, confirmed: (taskId: string) => boolean}} deps
 *   `pending`: the core's stacks (stacks.js); `confirmed`: whether the server's row of
 *   the task is known (its create settled).
 */
export function createSendOrder({ pending, now, confirmed }) {
  /**
   * Task id -> the versions our own ops settled at, as their events said (the last
   * MAX_OWN_VERSIONS): how far our own changes moved a task since an edit's base was taken.
   */
  const ownVersions = new Map();
  /**
   * Ops to send, in the order they are due: a new one not queued behind ours, a queued one
   * whose turn came, a rebased edit. The sync engine takes and sends them (`takeOutbox`);
   * the core alone decides when an op goes out.
   */
  let outbox = [];

  /**
   * The version an edit made on `madeOn` goes out on: that one and our own changes to the
   * task since, those whose events came. One that applied without its event here yet is
   * not counted: the edit then conflicts and is re-sent (the core's rebase), never applied
   * over a change unseen.
   */
  function baseFor(taskId, madeOn) {
    return madeOn + (ownVersions.get(taskId) ?? []).filter((settled) => settled > madeOn).length;
  }

  /** Put `op` out for the sync engine to send. */
  function send(op) {
    outbox = [...outbox, op];
  }

  /** Send a queued op now, on the version its task has by the user's own doing. */
  function release(op) {
    send(pending.replace(op, {
      base_version: baseFor(op.task_id, op.made_on),
      state: 'sending',
      sent_at: now(),
      overdue: undefined,
    }));
  }

  return {
    /** A new op goes out now unless it is queued behind ours (`placed`). */
    sendIfDue(op) {
      if (op.state === 'sending') send(op);
    },

    /** The placement of an edit or a delete made on `madeOn`: sent at once with nothing of ours ahead of it, else queued. */
    placed(taskId, madeOn) {
      if (pending.has(taskId)) return { made_on: madeOn, base_version: undefined, state: 'queued' };
      return { made_on: madeOn, base_version: baseFor(taskId, madeOn), state: 'sending' };
    },

    /** The first op on the task's stack goes out if it was queued: its turn has come. */
    sendQueued(taskId) {
      const first = pending.of(taskId)[0];
      if (first?.state === 'queued') release(first);
    },

    /**
     * Retry of an edit or a delete still queued behind ours after the timeout (`overdue`):
     * it goes now, with the ones queued ahead of it, in their order (a later edit never
     * ends under an earlier one), each on the version the task has by the user's own
     * doing. An op ahead that then applies first makes them conflict and be rebased,
     * never apply over a change. Not while something ahead has not reached the server
     * (the task's create, an edit refused 503): sent after it, it would apply first.
     * @returns {{waitFor: object[], sent: boolean}} `waitFor`: the ops ahead that it still
     *   waits for, for the caller to send again
     */
    sendNow(key) {
      const op = pending.find(key);
      if (op?.state !== 'queued') return { waitFor: [], sent: false };
      const stack = pending.of(op.task_id);
      const ahead = stack.slice(0, stack.indexOf(op));
      const waitedFor = ahead.filter((other) => other.state !== 'queued');
      if (!confirmed(op.task_id)) return { waitFor: waitedFor, sent: false };
      const unsent = waitedFor.filter((other) => !other.command_id);
      if (unsent.length) return { waitFor: unsent, sent: false };
      for (const queued of [...ahead.filter((other) => other.state === 'queued'), op]) release(queued);
      return { waitFor: [], sent: true };
    },

    /** An op of ours settled at `version` (its event said so). */
    settledAt(taskId, version) {
      ownVersions.set(taskId, [...(ownVersions.get(taskId) ?? []), version].slice(-MAX_OWN_VERSIONS));
    },

    /** The task is gone: its versions start over if it comes back. */
    forget(taskId) {
      ownVersions.delete(taskId);
    },

    /**
     * The ops due to be sent since the last call, in order: issued ones not queued behind
     * ours, queued ones whose turn came, rebased edits (under new keys).
     */
    takeOutbox() {
      // Not one that left its stack meanwhile (a queued edit discarded with the create it
      // waited for, say).
      const taken = outbox.filter((op) => pending.find(op.key) !== null);
      outbox = [];
      return taken;
    },
  };
}
