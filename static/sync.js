// The sync engine: turns user intents into core operations plus commands, feeds events,
// snapshots and status answers back into the core, runs the clock, and keeps pending
// operations across a reload. No DOM: the view calls these methods and renders the core.
//
// Time, ids, storage and the interval are injected so this layer runs under node too.

import { commandRequest, EVENT_FAILED, EVENT_RESET, EVENT_SETTLED, resentByItself } from './ops.js';

/** Where pending ops survive a reload. Per tab (sessionStorage): each tab owns its ops. */
export const STORAGE_KEY = 'settle.pending-ops.v1';
/** Where open conflicts (refused edits waiting for the user's choice) survive a reload. */
export const CONFLICTS_KEY = 'settle.conflicts.v1';
/** Where discarded ops are remembered across a reload, to tell if one applies after all. */
export const DISCARDED_KEY = 'settle.discarded.v1';
/**
 * Longest pause between two tries: to re-open a closed stream, to fetch the snapshot,
 * to send again an op that found no answer.
 */
const MAX_PAUSE_MS = 10_000;

/** The pause before try `attempt` (from 0): `firstMs`, doubling, up to MAX_PAUSE_MS. */
const pauseMs = (firstMs, attempt) => Math.min(MAX_PAUSE_MS, firstMs * 2 ** attempt);
/**
 * How many times running the event stream may fail to open again (the browser tries
 * about once a second) before the page says the server cannot be reached.
 */
const STREAM_ERRORS_UNREACHABLE = 3;

/**
 * @param {{core: object, transport: object, newId?: () => string, storage?: Storage | null,
 *          tickMs?: number, setInterval?: Function, clearInterval?: Function,
 *          setTimeout?: Function, log?: (message: string, error?: unknown) => void}} options
 */
export function createSync({
  core,
  transport,
  newId = () => crypto.randomUUID(),
  storage = null,
  tickMs = 100,
  setInterval: startInterval = globalThis.setInterval,
  clearInterval: stopInterval = globalThis.clearInterval,
  setTimeout: later = globalThis.setTimeout,
  log = () => {},
}) {
  let stream = null;
  let resyncing = null;
  let reconnectAttempts = 0;
  /** Errors of the event stream since it was last open. */
  let streamErrors = 0;
  let tickHandle = null;
  let stopped = false;
  /** Keys with a request on the wire, so a resync does not send them twice at once. */
  const sendingKeys = new Set();
  /** Per-task promise chain: a task's commands reach the server in issue order. */
  const sendChains = new Map();
  /**
   * The tab's creates in one chain too, across tasks: the server takes them, and lists
   * them, in the order they were typed (sent at once, a later one could be taken first).
   */
  let createChain = null;
  /** Key -> how often an op's attempts failed while the stream was open (`sendAgainLater`). */
  const unansweredSends = new Map();
  /** Keys whose pause before going again runs now: one pause at a time per op. */
  const pausedSends = new Set();
  /** Storage key -> what was last written there. */
  const lastPersisted = new Map();

  // ---- commands ----------------------------------------------------------------------

  async function send(op) {
    try {
      const result = await transport.sendCommand(commandRequest(op), op.key);
      if (result.outcome === 'accepted') {
        core.accepted(op.key, result);
        // Sent before (a retry, a reload, a like taken over from a closed tab): it may have
        // applied already, its event before this page's stream.
        const accepted = core.getOp(op.key);
        if (result.replayed && accepted) checkStatus(accepted, { ifDone: true });
      } else if (result.outcome === 'rejected') {
        core.rejected(op.key, result);
      } else {
        // 'unavailable': stuck, saying so; sent again when the stream opens (`openStream`),
        // or after a pause (`sendAgainLater`).
        log(`command ${op.key} not sent: ${result.detail}`);
        core.unreached(op.key, result);
      }
    } finally {
      sendingKeys.delete(op.key);
    }
    if (resentByItself(core.getOp(op.key)?.unreached)) sendAgainLater(op.key);
    else unansweredSends.delete(op.key);
  }

  /**
   * An op whose attempts all failed waits for the stream to open (`openStream`). If the
   * stream is open already (it came back while the attempts found no answer, or the
   * server refused them for now: a full backlog, a 503; `resentByItself`), that would not
   * come: the op goes again after a pause, longer each time.
   */
  function sendAgainLater(key) {
    if (!streamOpen() || pausedSends.has(key)) return;
    const pauses = unansweredSends.get(key) ?? 0;
    unansweredSends.set(key, pauses + 1);
    pausedSends.add(key);
    later(() => {
      pausedSends.delete(key);
      const op = !stopped && core.getOp(key);
      if (!op) unansweredSends.delete(key);
      else if (resentByItself(op.unreached) && streamOpen()) sendAgain([op]);
    }, pauseMs(1_000, pauses));
  }

  /**
   * Queue a send behind the task's earlier sends, and a create's first send behind the
   * tab's earlier creates too (202s are quick; this keeps their order). A create sent
   * again (`again`: it could not be sent, or the page was reloaded) goes out without
   * waiting for those typed after it. A key already queued or on the wire is not sent
   * again meanwhile; one discarded while it waited is not sent at all.
   */
  function enqueueSend(op, { again = false } = {}) {
    if (sendingKeys.has(op.key)) return sendChains.get(op.task_id) ?? Promise.resolve();
    sendingKeys.add(op.key);
    const create = op.kind === 'create' && !again;
    const previous = Promise.all([sendChains.get(op.task_id), create ? createChain : null]);
    const next = previous.then(() => {
      const current = core.getOp(op.key);
      if (current) return send(current);
      sendingKeys.delete(op.key);
      return undefined;
    }).catch((error) => log('send failed', error));
    sendChains.set(op.task_id, next);
    if (create) createChain = next;
    next.then(() => {
      if (sendChains.get(op.task_id) === next) sendChains.delete(op.task_id);
      if (createChain === next) createChain = null;
    });
    return next;
  }

  // ---- events and ground truth ---------------------------------------------------------

  /**
   * After a failure, snap to ground truth: the counts fragment for likes, the task for edits
   * and deletes. A failed create left no row (its id is ours, new), and a `not_found` says
   * the row is gone: nothing to fetch, and the 404 would only be logged as a console error.
   */
  async function refetchGroundTruth(op, reason) {
    if (op.kind === 'create' || reason === 'not_found' || core.isDeleted(op.task_id)) return undefined;
    try {
      if (op.kind === 'like') {
        const counts = await transport.fetchCounts(op.task_id);
        if (!counts) return core.taskFetched(op.task_id, null);
        if (core.countsFetched(counts) !== 'newer') return undefined;
      }
      core.taskFetched(op.task_id, await transport.fetchTask(op.task_id));
    } catch (error) {
      log('re-fetch after failure failed', error);
    }
    return undefined;
  }

  /**
   * Whether the event stream is open: 'live', or 'unresponsive' while requests find no
   * answer over it (a server frozen with its sockets open).
   */
  function streamOpen() {
    const { connection } = core.getSnapshot();
    return connection === 'live' || connection === 'unresponsive';
  }

  /** A live stream over which requests find no answer says so; an answer, or an event, ends that. */
  function answerHeard(answered) {
    const { connection } = core.getSnapshot();
    if (!answered && connection === 'live') core.setConnection('unresponsive');
    else if (answered && connection === 'unresponsive') core.setConnection('live');
  }
  const unwatchAnswers = transport.watchAnswers?.(answerHeard);

  function onEvent(event) {
    answerHeard(true);
    if (event.type === EVENT_RESET) {
      resync();
      return;
    }
    if (!event.data || !Number.isFinite(event.id)) return;
    const { applied, op } = core.applyEvent(event);
    if (applied && op && event.type === EVENT_FAILED) refetchGroundTruth(op, event.data.reason);
  }

  function openStream() {
    stream?.close();
    stream = transport.openEvents(core.watermark, {
      onEvent,
      onOpen: () => {
        reconnectAttempts = 0;
        streamErrors = 0;
        core.setConnection('live');
        // The server is there: what could not reach it (`core.unreached`), or got no 202
        // in time, goes again.
        sendAgain(core.pendingOps().filter((op) => !op.command_id && op.state === 'stuck'));
      },
      onError: ({ closed }) => {
        // Not a moment's drop but every try failing: the server is down, or out of reach.
        // One that answered with an error (`closed`) was reached.
        streamErrors = closed ? 0 : streamErrors + 1;
        core.setConnection(streamErrors >= STREAM_ERRORS_UNREACHABLE ? 'unreachable' : 'reconnecting');
        // While CONNECTING the browser resumes by itself with Last-Event-ID. Once CLOSED
        // (the server answered with an error) it is ours to do: snapshot, then reopen.
        if (closed) {
          later(() => resync(), pauseMs(500, reconnectAttempts));
          reconnectAttempts += 1;
        }
      },
    });
  }

  /**
   * Send `ops` again under their own keys; their timeouts start over. One on its way
   * already (queued behind a slow send on its task, say) is not sent twice, but shows as
   * being sent all the same: a Retry that changed nothing on screen would look ignored.
   */
  function sendAgain(ops) {
    // Not one queued behind ours: it has no version to go out on yet (`core.sendNow`).
    return Promise.all(ops.filter((op) => core.getOp(op.key)?.state !== 'queued').map((op) => {
      core.resending(op.key);
      return sendingKeys.has(op.key) ? undefined : enqueueSend(core.getOp(op.key), { again: true });
    }));
  }

  /**
   * Ask the status endpoint about ops, by command id, or by key for one that never got
   * its 202; the answers go into `loadSnapshot`.
   */
  async function commandOutcomes(ops) {
    const outcomes = await Promise.all(ops.map(async (op) => {
      try {
        const command = op.command_id ? await transport.fetchCommand(op.command_id) : await transport.fetchCommandByKey(op.key);
        return command && { key: op.key, status: command.status, event_id: command.event_id, error: command.error };
      } catch {
        return null;
      }
    }));
    return outcomes.filter(Boolean);
  }

  /**
   * Snapshot, then stream from its watermark. Pending ops survive and stay folded on top.
   * Ops restored from storage that never got their 202 are sent again under their key;
   * ops whose event is already inside the snapshot are settled by their status answer.
   */
  function resync() {
    if (resyncing) return resyncing;
    resyncing = (async () => {
      stream?.close();
      stream = null;
      core.setConnection('connecting');
      let snapshot = null;
      for (let attempt = 0; !snapshot && !stopped; attempt += 1) {
        try {
          snapshot = await transport.fetchSnapshot();
        } catch (error) {
          log('snapshot failed', error);
          // Said, not only logged: the page waits on the server, and says it is trying.
          core.setConnection('unreachable');
          await new Promise((resolve) => later(resolve, pauseMs(500, attempt)));
        }
      }
      if (stopped) return;
      core.setConnection('connecting'); // reached: no longer "unreachable" while the rest runs
      streamErrors = 0;
      await sendAgain(core.pendingOps().filter((op) => !op.command_id && op.state !== 'queued'));
      // Discarded ops too: one applied after all while the page was away is inside the
      // snapshot, and its event will not come again. One discarded before its 202 is
      // asked after by its key: the request may have arrived all the same.
      const sent = core.pendingOps().filter((op) => op.command_id);
      const outcomes = await commandOutcomes([...sent, ...core.persistedDiscarded()]);
      core.loadSnapshot(snapshot, { outcomes, force: true });
      openStream();
    })().finally(() => {
      resyncing = null;
    });
    return resyncing;
  }

  // ---- the clock -------------------------------------------------------------------------

  /**
   * An op overdue for its event: ask the server what became of it before offering Retry.
   * With `ifDone`, an op that is still pending (or that cannot be asked about) is left as
   * it is.
   */
  async function checkStatus(op, { ifDone = false } = {}) {
    let command = null;
    let task;
    try {
      command = await transport.fetchCommand(op.command_id);
      if (ifDone && command?.status !== 'settled' && command?.status !== 'failed') return;
      // A command failed with `not_found` has no row to fetch (the 404 would be logged).
      if (command?.error?.reason === 'not_found' || core.isDeleted(op.task_id)) task = null;
      else if (command && command.status !== 'pending') task = await transport.fetchTask(op.task_id);
    } catch (error) {
      log('status check failed', error);
      if (ifDone) return;
      // Done, but the row it left could not be read: taken off its stack now, the op
      // would leave the task shown as before it (an edit undone, a deleted row back)
      // until the next snapshot. As not asked: stuck, its event or a Retry settles it.
      command = null;
    }
    core.statusChecked(op.key, command, task);
  }

  function tick() {
    for (const op of core.tick()) checkStatus(op);
  }

  // ---- persistence -------------------------------------------------------------------------

  /** What a tab keeps across a reload: storage key, the core's list of it, and its restore. */
  const persisted = [
    [STORAGE_KEY, core.persistedOps, core.restore],
    [CONFLICTS_KEY, core.persistedConflicts, core.restoreConflicts],
    [DISCARDED_KEY, core.persistedDiscarded, core.restoreDiscarded],
  ];

  function persist() {
    if (!storage) return;
    for (const [key, list] of persisted) {
      const serialized = JSON.stringify(list());
      if (serialized === lastPersisted.get(key)) continue;
      try {
        storage.setItem(key, serialized);
        lastPersisted.set(key, serialized);
      } catch (error) {
        log(`cannot persist ${key}`, error);
      }
    }
  }

  /**
   * Every list is read before any is put back, and all are written once they are: putting
   * one back changes the core, whose change persists every list, so a list not read yet
   * would be overwritten with the core's empty one (pending ops restored, then the
   * discarded ops and open conflicts lost with them), and one put back without a change
   * would stay overwritten until the next.
   */
  function restore() {
    if (!storage) return;
    const lists = persisted.map(([key]) => {
      try {
        const saved = JSON.parse(storage.getItem(key) ?? '[]');
        return Array.isArray(saved) ? saved : [];
      } catch (error) {
        log(`ignoring unreadable ${key}`, error);
        return [];
      }
    });
    persisted.forEach(([, , put], index) => {
      if (lists[index].length) put(lists[index]);
    });
    persist();
  }

  // ---- the public API ------------------------------------------------------------------------
  //
  // An intent is issued to the core, which shows it at once and puts it in its outbox
  // unless it waits behind ours on the task; the same intent again (double click, double
  // Enter) is the op already issued: one key, one effect.

  /** Send the ops the core put out: every new or rebased op, and a queued one whose turn came. */
  function sendOutbox() {
    for (const op of core.takeOutbox()) enqueueSend(op);
  }

  const unsubscribePersist = core.subscribe(persist);
  const unsubscribeOutbox = core.subscribe(sendOutbox);

  return {
    /** Restore pending ops, load the snapshot, open the stream, start the clock. */
    start() {
      restore();
      tickHandle = startInterval(tick, tickMs);
      return resync();
    },
    stop() {
      stopped = true;
      stopInterval(tickHandle);
      stream?.close();
      unsubscribePersist();
      unsubscribeOutbox();
      unwatchAnswers?.();
    },
    resync,
    /** A fresh identifier for a task or an intent's key. */
    newId,

    /**
     * Create a task. The caller passes the draft's `id` and `key` so that submitting the
     * same draft twice is the same intent.
     */
    createTask({ title, notes = '', id = newId(), key = newId() }) {
      return core.issue({ kind: 'create', key, task_id: id, title, notes });
    },
    /**
     * Edit title and/or notes on `base` ({base_version, seen}, from `core.editBase`): by
     * default the confirmed version and the values shown now; an editor passes the base it
     * took when it opened. Behind our own pending ops on the task it waits for them, and
     * goes out on the version they led to (`sendQueued`, send-order.js), so only someone
     * else's change conflicts.
     */
    editTask(taskId, patch, key = newId(), base = core.editBase(taskId)) {
      return core.issue({ kind: 'update', key, task_id: taskId, patch, ...base });
    },
    /** Set done: a set-to-value intent, last writer wins by design (no base_version). */
    setDone(taskId, done, key = newId()) {
      return core.issue({ kind: 'update', key, task_id: taskId, patch: { done } });
    },
    /**
     * Delete on the base shown now (`core.editBase`): someone else's edit that the user
     * has not seen yet makes it conflict instead of being deleted with the task.
     */
    deleteTask(taskId, key = newId(), base = core.editBase(taskId)) {
      return core.issue({ kind: 'delete', key, task_id: taskId, ...base });
    },
    /**
     * A counter delta (+1 / -1): commutes, never conflicts. `compensating`: sent by the
     * page itself, not by a click (likes.js).
     */
    like(taskId, delta, key = newId(), { compensating = false } = {}) {
      return core.issue({ kind: 'like', key, task_id: taskId, delta, compensating });
    },
    /**
     * Which of `ops` (not this page's yet: ops taken over from a tab that closed) are done,
     * as `core.restore` takes them: key -> `{type, reason}`. One done before this page's
     * snapshot has no event to come, and restored as pending it would count twice until
     * its status was asked. Asked as after a reconnect (`commandOutcomes`): by key for one
     * whose 202 its tab never saw, as a tab closed right after the click. Ops not answered
     * are left out.
     */
    async outcomesOf(ops) {
      const known = new Map();
      for (const { key, status, error } of await commandOutcomes(ops)) {
        if (status === 'settled') known.set(key, { type: EVENT_SETTLED });
        if (status === 'failed') known.set(key, { type: EVENT_FAILED, reason: error?.reason });
      }
      return known;
    },
    /**
     * The browser is online again: what no attempt could send goes now, not at the end of
     * its pause (`sendAgainLater`).
     */
    online() {
      unansweredSends.clear();
      return sendAgain(core.pendingOps().filter((op) => resentByItself(op.unreached)));
    },
    /** Send a stuck op again under its own key: the server answers a replay, never a second effect. */
    retry(key) {
      const op = core.getOp(key);
      if (!op) return undefined;
      // One still queued behind ours goes now, or, while its task's create is ahead of
      // it, what it waits for is sent again.
      if (op.state === 'queued') return sendAgain(core.sendNow(key));
      return sendAgain([op]);
    },
    discard(key) {
      core.discard(key);
    },
    /** Keep mine: the user's change again, on the current version, as a NEW intent (new key). */
    keepMine(taskId) {
      const intent = core.resolveConflict(taskId, 'mine');
      return intent ? core.issue({ ...intent, key: newId() }) : undefined;
    },
    takeTheirs(taskId) {
      core.resolveConflict(taskId, 'theirs');
    },
    /** Dismiss the notice `id`, or every notice when `id` is omitted. */
    dismissNotice(id) {
      core.dismissNotice(id);
    },
  };
}
