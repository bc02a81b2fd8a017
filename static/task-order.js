// The order the list shows tasks in: the server's, as far as this tab can know it.
//
// The server lists tasks in the order it took their creates (`GET /api/tasks`), and the
// creates' `accepted_at` rise in that order (its intake keeps them so). A tab knows the
// order of its last snapshot's tasks; of a task created since, it knows when its create
// was taken (the 202 of its own create, the event of anyone's), and lists it after the
// snapshot's tasks, among the others created since, by that time. So two tabs that
// create tasks in the same moments list them alike, and as the server does. A create
// of its own with no 202 yet is listed last. Not known here: a create the server took
// before some of the snapshot's tasks but applied after the snapshot (one redelivered
// after a lost delivery, say) is listed after them until the next snapshot.
//
// Pure: no DOM, no fetch, no timers.

/**
 * An RFC 3339 UTC time as the server writes it (`2026-11-28T08:31:43.7535594Z`) in a
 * form whose string order is its time order, to the nanosecond (a JS Date keeps
 * milliseconds); null for anything else.
 */
export function creationKey(text) {
  const match = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z$/.exec(text ?? '');
  return match ? `${match[1]}.${(match[2] ?? '').padEnd(9, '0')}` : null;
}

export function createTaskOrder() {
  /** @type {string[]} task ids, replaced on every change (the view compares it) */
  let ids = [];
  /** The last snapshot's tasks: listed first, in its order. */
  let fromSnapshot = new Set();
  /** Task id -> when its create was taken (`creationKey`), for a task created since. */
  const createdAt = new Map();

  return {
    get ids() {
      return ids;
    },

    /** List task `id` last, unless it is listed. */
    add(id) {
      if (!ids.includes(id)) ids = [...ids, id];
    },

    remove(id) {
      if (ids.includes(id)) ids = ids.filter((listed) => listed !== id);
      createdAt.delete(id);
    },

    /**
     * The server took the create of listed task `id` at `acceptedAt` (RFC 3339): it goes
     * where the server lists it, after the tasks created before it.
     */
    created(id, acceptedAt) {
      const at = creationKey(acceptedAt);
      if (at === null || fromSnapshot.has(id) || !ids.includes(id)) return;
      createdAt.set(id, at);
      const rest = ids.filter((listed) => listed !== id);
      let index = rest.length;
      // Back over the tasks created after it, and those not yet known to be taken.
      while (index > 0 && !fromSnapshot.has(rest[index - 1]) && !(createdAt.get(rest[index - 1]) < at)) {
        index -= 1;
      }
      ids = [...rest.slice(0, index), id, ...rest.slice(index)];
    },

    /**
     * A snapshot came: its tasks first, in its order, then the listed tasks `kept` says
     * stay (creates of the tab's own still on their way), in their order here.
     */
    snapshot(snapshotIds, kept) {
      fromSnapshot = new Set(snapshotIds);
      const staying = ids.filter((id) => !fromSnapshot.has(id) && kept(id));
      const stays = new Set(staying);
      for (const id of [...createdAt.keys()]) if (!stays.has(id)) createdAt.delete(id);
      ids = [...snapshotIds, ...staying];
    },
  };
}
