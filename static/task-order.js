// The order the list shows tasks in: the server's, as far as this tab can know it.
//
// The server lists tasks in the order it took their creates (`GET /api/tasks`), and the
// creates' `accepted_at` rise in that order (its intake keeps them so). A tab knows the
// order of its last snapshot's tasks; of a task created since, it knows when its create
// was taken (the 202 of its own create, its status, the event of anyone's), and lists it
// after the snapshot's tasks, among the others created since, by that time. So two tabs
// that create tasks in the same moments list them alike, and as the server does. A
// create of its own with no 202 yet is listed last; a task known without its create's
// time (fetched by itself) stays where it came, after those listed before it. Not
// known here: a create the server took before some of the snapshot's tasks but applied
// after the snapshot was read (its apply later than theirs: jitter, a lowered delay, a
// retried or redelivered apply) is listed after them until the next snapshot.
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
  /** Creates of the tab's own whose time is not known yet: listed last. */
  const awaiting = new Set();

  /** Whether `id`, listed before a task taken at `at`, belongs after it. */
  const later = (id, at) => awaiting.has(id) || (createdAt.has(id) && createdAt.get(id) > at);

  return {
    get ids() {
      return ids;
    },

    /**
     * List task `id` last, unless it is listed; `awaiting`: a create of the tab's own,
     * whose time is to come.
     */
    add(id, { awaiting: ours = false } = {}) {
      if (ids.includes(id)) return;
      ids = [...ids, id];
      if (ours) awaiting.add(id);
    },

    remove(id) {
      if (ids.includes(id)) ids = ids.filter((listed) => listed !== id);
      createdAt.delete(id);
      awaiting.delete(id);
      fromSnapshot.delete(id);
    },

    /**
     * The server took the create of listed task `id` at `acceptedAt` (RFC 3339): it goes
     * where the server lists it, after the tasks created before it.
     */
    created(id, acceptedAt) {
      const at = creationKey(acceptedAt);
      const from = ids.indexOf(id);
      if (at === null || fromSnapshot.has(id) || from < 0) return;
      createdAt.set(id, at);
      awaiting.delete(id);
      // Back over the tasks created after it, and the creates not yet known to be taken.
      let index = ids.length;
      while (index > 0 && (ids[index - 1] === id || later(ids[index - 1], at))) index -= 1;
      // Where it is already (its event after its 202, events in the order taken): as is.
      if (index === from) return;
      const rest = ids.filter((listed) => listed !== id);
      const into = index > from ? index - 1 : index;
      ids = [...rest.slice(0, into), id, ...rest.slice(into)];
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
      for (const id of [...awaiting]) if (!stays.has(id)) awaiting.delete(id);
      ids = [...snapshotIds, ...staying];
    },
  };
}
