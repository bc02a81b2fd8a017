// The client core: confirmed state + a per-task stack of pending operations.
//
// Pure and framework-agnostic: no DOM, no fetch, no timers. Time comes from the injected
// `now()`, identifiers (task ids, idempotency keys) come from the caller. The transport and
// the view drive it; a React app would bind it with
// `useSyncExternalStore(core.subscribe, core.getSnapshot)`.
//
// The model (see ../shared/DESIGN.md, "Client: the core's state"):
//   base:      Map<task_id, Task>   confirmed, from the snapshot and settled events
//   pending:   task_id -> Op[]      the user's operations in issue order, not yet settled
//                                   (stacks.js)
//   watermark: id of the last event whose effect `base` includes
//   view(id) = pending[id] folded over base[id]
//
// Why a stack and not one optimistic value per task: rapid like/unlike/like must compose,
// acknowledgements may arrive in any order, and a failure must remove exactly one
// operation and leave the others standing. Folding the remaining ops over the confirmed
// base gives all three for free.
//
// See also send-order.js (when a queued edit goes out, and on which version),
// departures.js (what is remembered of ops once they left their stacks) and
// task-order.js (the order the list shows tasks in).

import {
  appliedLateText, discardText, EVENT_FAILED, EVENT_SETTLED, failureText, isSavedOp, KINDS,
  noticeOf, persistedFields, refusedText,
} from './ops.js';
import { createDepartures } from './departures.js';
import { createNotices } from './notices.js';
import { createPublisher } from './publish.js';
import { conflictOf, createConflictBook, rebasePlan, seenValues } from './conflicts.js';
import { createSendOrder } from './send-order.js';
import { createStacks } from './stacks.js';
import { createTaskOrder } from './task-order.js';

/** How many client-measured windows are kept for the chart. */
const MAX_WINDOW_SAMPLES = 500;

/**
 * Create a client core.
 * @param {{now?: () => number, newKey?: () => string, stuckMs?: number, syncMs?: number}} options
 *   `now` in milliseconds (Date.now by default, so issue times survive a reload);
 *   `stuckMs`: age since the last send after which an op is checked and offered Retry;
 *   `syncMs`: age since issue after which an op lights the sync indicator.
 */
export function createCore({
  now = Date.now,
  newKey = () => globalThis.crypto.randomUUID(),
  stuckMs = 5000,
  syncMs = 800,
} = {}) {
  /** @type {Map<string, object>} confirmed tasks, frozen */
  let base = new Map();
  /** The order the list shows tasks in: the server's, as far as it is known (task-order.js). */
  const taskOrder = createTaskOrder();
  /** Task id -> the user's ops not yet settled, in issue order (stacks.js). */
  const pending = createStacks();
  /**
   * Task id -> the id of the event its delete settled by (Infinity when not known): a late
   * re-fetch, or a snapshot from before that event, must not bring the task back.
   */
  const deleted = new Map();
  /** The open conflicts, yours against theirs, one per task (conflicts.js). */
  const conflicts = createConflictBook();
  /**
   * Task id -> title of a create that failed while later ops on the predicted task were
   * still pending: they fail too (`not_found`), and their notices name the task and say why.
   */
  const failedCreates = new Map();
  /** Task id -> last confirmed title of a task that is gone, to name it in a notice. */
  const goneTitles = new Map();
  /** What is remembered of ops that left their stacks (departures.js). */
  const departures = createDepartures();
  let watermark = 0;
  /** Whether a snapshot of the server's tasks has come: before it, only pending creates are known. */
  let loaded = false;
  /** Why ops failed, were refused or discarded, kept until dismissed (notices.js). */
  const notices = createNotices({ now });
  let windowSamples = [];
  let connection = 'connecting';
  /** The snapshot for the view, and who listens for its changes (publish.js). */
  const publisher = createPublisher({ syncMs });
  /** When a task's edits go out, on which version, and the ops due to be sent (send-order.js). */
  const sendOrder = createSendOrder({ pending, now, confirmed: (taskId) => base.has(taskId) });

  function changed() {
    publisher.changed(pending.all(), now());
  }

  // ---- lookups -------------------------------------------------------------------

  /** An event names its op by idempotency key (known from the click on), else by command id. */
  function opOfEvent(event) {
    return (event.idempotency_key && pending.find(event.idempotency_key)) || pending.findByCommandId(event.command_id);
  }

  /**
   * The title to name an op by: the confirmed one, else the one it is being created with,
   * else the last one known (the task is gone: deleted elsewhere, or its create failed),
   * else the one it had when the op was issued (kept across a reload).
   */
  function titleOf(op) {
    return base.get(op.task_id)?.title
      ?? pending.of(op.task_id).find((candidate) => candidate.kind === 'create')?.title
      ?? failedCreates.get(op.task_id) ?? goneTitles.get(op.task_id) ?? op.named ?? op.title;
  }

  // ---- mutations of the stacks -----------------------------------------------------

  /** Take `op` off its stack, and note how it left. */
  function removeOp(op, outcome, reason) {
    departures.depart(op, outcome, reason);
    pending.remove(op);
    if (!pending.has(op.task_id)) failedCreates.delete(op.task_id);
    // A failed or discarded create leaves no orphan row in the order.
    if (!base.has(op.task_id) && !pending.has(op.task_id)) taskOrder.remove(op.task_id);
    sendOrder.sendQueued(op.task_id);
  }

  function pushOp(op) {
    pending.push(op);
    if (op.kind !== 'create') return;
    // Listed last until the server's time for it is known (its 202, kept across a reload).
    taskOrder.add(op.task_id, { awaiting: true });
    if (op.accepted_at) taskOrder.created(op.task_id, op.accepted_at);
  }

  /** Confirmed state moves forward only: a newer version, never an older one. */
  function confirm(task) {
    if (!task || deleted.has(task.id)) return false;
    const known = base.get(task.id);
    if (known && known.version >= task.version) return false;
    base.set(task.id, Object.freeze({ ...task }));
    taskOrder.add(task.id);
    conflicts.refresh(task.id, base.get(task.id));
    return true;
  }

  /** `tombstone`: the id of the event the task's delete settled by, or true when not known. */
  function forget(taskId, { tombstone }) {
    const gone = base.get(taskId);
    if (gone) goneTitles.set(taskId, gone.title);
    base.delete(taskId);
    sendOrder.forget(taskId);
    if (tombstone) deleted.set(taskId, tombstone === true ? Infinity : tombstone);
    conflicts.close(taskId);
    dropUnaccepted(taskId);
    if (!pending.has(taskId)) taskOrder.remove(taskId);
  }

  /**
   * Ops with no 202 yet, on a task that is gone with no create of ours to bring it back:
   * without a row they could be neither shown nor retried nor discarded (a like refused
   * 503 four times, say, when someone else's delete of the task settles). They fail as
   * the server fails a change to a missing task, `not_found`, which is what a late 202
   * would come to. A delete among them has what it asked for, whoever deleted the task
   * (its own request may have been taken, its answer lost): it leaves without a word.
   * One the server took leaves by its own event.
   */
  function dropUnaccepted(taskId) {
    if (base.has(taskId) || pending.of(taskId).some((op) => op.kind === 'create')) return;
    const orphaned = failedCreates.has(taskId);
    for (;;) {
      // Found again each time: removing one may send the next (`sendOrder.sendQueued`).
      const op = pending.of(taskId).find((candidate) => !candidate.command_id);
      if (!op) return;
      const title = titleOf(op);
      removeOp(op, 'failed', 'not_found');
      if (op.kind !== 'delete') sayFailed(op, title, { reason: 'not_found', orphaned });
    }
  }

  /**
   * The notice of a failed op. None for a like the page sent by itself on a task now
   * gone: the user did not click it, and the task's going is what there is to see.
   */
  function sayFailed(op, title, { reason, message, orphaned = false, fate = null }) {
    if (op.compensating && reason === 'not_found') return;
    const text = failureText(op, title, { reason, message, orphaned, keptMoving: fate === 'kept_moving' });
    notices.add(noticeOf(op, 'error', fate ?? reason, text));
  }

  /**
   * An op of ours failed: remove it alone, snap the task to ground truth (`current`),
   * say why, and open a conflict record when the server refused a stale edit.
   */
  function failOp(op, { reason, message, current }) {
    // A conflict is named by the title the user saw when making the edit: the task's
    // title now may be the one that beat it.
    const title = (reason === 'conflict' && op.named) || titleOf(op);
    const orphaned = reason === 'not_found' && failedCreates.has(op.task_id);
    const stack = pending.of(op.task_id);
    const later = stack.slice(stack.indexOf(op) + 1);
    removeOp(op, 'failed', reason);
    if (current) confirm(current);
    else if (reason === 'not_found') forget(op.task_id, { tombstone: false });
    const fate = reason === 'conflict' ? rebase(op, later) : null;
    if (fate === 'resent') return;
    if (op.kind === 'create' && pending.has(op.task_id)) failedCreates.set(op.task_id, title);
    sayFailed(op, title, { reason, message, orphaned, fate });
    const theirs = current ?? base.get(op.task_id);
    if (reason === 'conflict' && theirs && (op.kind === 'update' || op.kind === 'delete')) {
      conflicts.open(conflictOf(op, theirs, fate === 'kept_moving'));
    }
  }

  /** The values the user may have been shown of a task, as of now (`seenValues`). */
  function seenNow(taskId) {
    return seenValues(base.get(taskId), pending.of(taskId));
  }

  /**
   * An edit or a delete refused as a conflict: re-sent by itself on the current version
   * when nobody else's edit explains it (`rebasePlan`), as a new command under a new key.
   * @returns {'resent' | 'kept_moving' | null} null: someone else changed what it sets
   */
  function rebase(op, later) {
    const plan = rebasePlan(op, base.get(op.task_id), later);
    if (plan?.fate !== 'resent') return plan?.fate ?? null;
    if (plan.fields.length) {
      const next = Object.freeze({
        ...op,
        key: newKey(),
        command_id: null,
        patch: op.patch && Object.freeze(Object.fromEntries(plan.fields.map((field) => [field, op.patch[field]]))),
        seen: seenNow(op.task_id),
        rebased: (op.rebased ?? 0) + 1,
        sent_at: now(),
        ...sendOrder.placed(op.task_id, base.get(op.task_id)?.version ?? 0),
      });
      pushOp(next);
      sendOrder.sendIfDue(next);
    }
    return 'resent';
  }

  // ---- the public API ----------------------------------------------------------------

  /**
   * Push a user intent onto its task's stack; the view shows it at once.
   * Issuing a key that is already pending returns the existing op unchanged: one intent,
   * one key, one effect, however many times the user clicks.
   * An edit or a delete with a `base_version` also records the values it was made on
   * (`seen`, by default as of now; an editor passes those of `editBase` when it opened).
   * @param {{kind: string, key: string, task_id: string, title?: string, notes?: string,
   *          patch?: object, delta?: number, base_version?: number, seen?: object}} intent
   * @returns {object} the (frozen) op
   */
  function issue(intent) {
    const existing = pending.find(intent.key);
    if (existing) return existing;
    if (!KINDS.includes(intent.kind)) throw new Error(`unknown operation kind ${intent.kind}`);
    if (!intent.key || !intent.task_id) throw new Error('an operation needs a key and a task id');
    const issuedAt = now();
    const named = intent.kind === 'create' ? intent.title : titleOf({ task_id: intent.task_id });
    const onBase = intent.base_version != null && (intent.kind === 'update' || intent.kind === 'delete');
    const op = Object.freeze({
      key: intent.key,
      command_id: null,
      task_id: intent.task_id,
      kind: intent.kind,
      title: intent.kind === 'create' ? intent.title : undefined,
      notes: intent.kind === 'create' ? intent.notes ?? '' : undefined,
      patch: intent.kind === 'update' ? Object.freeze({ ...intent.patch }) : undefined,
      delta: intent.kind === 'like' ? intent.delta : undefined,
      seen: onBase ? intent.seen ?? seenNow(intent.task_id) : undefined,
      named: named ?? undefined,
      // A like or unlike the page sent by itself, to bring the browser's share where the
      // user's clicks put it (likes.js): its notices say so.
      compensating: intent.kind === 'like' && intent.compensating ? true : undefined,
      issued_at: issuedAt,
      sent_at: issuedAt,
      state: 'sending',
      ...(onBase ? sendOrder.placed(intent.task_id, intent.base_version) : {}),
    });
    pushOp(op);
    sendOrder.sendIfDue(op);
    changed();
    return op;
  }

  /**
   * The server answered 202: the op is durable and waits for its event. A create's task
   * is listed where the server lists it (task-order.js).
   */
  function accepted(key, { command_id, accepted_at }) {
    const op = pending.find(key);
    // Discarded while its request was on the way: its status can be asked after a reload.
    if (!op) {
      departures.discardedAccepted(key, command_id);
      return;
    }
    // Taken after all: a concurrent attempt's failure (`unreached`) no longer holds.
    pending.replace(op, {
      command_id,
      accepted_at,
      state: op.state === 'checking' ? 'checking' : 'pending',
      unreached: undefined,
    });
    if (op.kind === 'create') taskOrder.created(op.task_id, accepted_at);
    changed();
  }

  /** Retry: the op is being sent again under its own key; its timeout starts over. */
  function resending(key) {
    const op = pending.find(key);
    // A queued one has no version to go out on yet (`sendNow`).
    if (!op || op.state === 'queued') return;
    pending.replace(op, { state: 'sending', sent_at: now(), unreached: undefined });
    changed();
  }

  /**
   * Every attempt to send the op failed before the server took it (no connection, or the
   * server unavailable): it may never have arrived, and nothing is processing it that the
   * page knows of. It is `stuck` at once, saying why (`unreached`: `{offline, detail}`),
   * with Retry and Discard; the sync engine sends it again when the connection is back.
   */
  function unreached(key, { offline, status = null, detail }) {
    const op = pending.find(key);
    if (!op || op.command_id) return;
    const why = status == null ? { offline, detail } : { offline, status, detail };
    pending.replace(op, { state: 'stuck', unreached: Object.freeze(why) });
    changed();
  }

  /** The server refused the command before accepting it (a 4xx): it never becomes pending. */
  function rejected(key, { status, detail }) {
    const op = pending.find(key);
    if (!op) return;
    const title = titleOf(op);
    removeOp(op, 'rejected');
    notices.add(noticeOf(op, 'error', `http_${status}`, refusedText(op, title, { status, detail })));
    changed();
  }

  /**
   * Apply one SSE event. Events at or below the watermark are already in `base` and are
   * ignored, so a replay at a resume seam never applies twice.
   * @param {{id: number, type: string, data: object}} event
   * @returns {{applied: boolean, op: object | null}} `op` is ours when the event settles one
   */
  function applyEvent({ id, type, data }) {
    if (!(id > watermark)) return { applied: false, op: null };
    watermark = id;
    const op = opOfEvent(data);
    if (type === EVENT_SETTLED) {
      // The id of a deleted task may be created again (another client chose it): a new
      // life of it, which the tombstone of the last one does not hide.
      if (data.task && data.kind === 'create') deleted.delete(data.task_id);
      if (data.task) confirm(data.task);
      if (data.task && data.kind === 'create') taskOrder.created(data.task_id, data.accepted_at);
      if (op) {
        if (data.task && data.version != null) sendOrder.settledAt(op.task_id, data.version);
        removeOp(op, 'settled');
        const at = now();
        windowSamples = [...windowSamples, Object.freeze({ at, ms: Math.max(0, at - op.issued_at) })]
          .slice(-MAX_WINDOW_SAMPLES);
      }
      // After the event's own op has left as settled: a delete of ours whose 202 has not
      // come is not taken for one that the deleted task left behind (`dropUnaccepted`).
      if (!data.task && data.kind === 'delete') forget(data.task_id, { tombstone: id });
    } else if (type === EVENT_FAILED) {
      if (op) failOp(op, data);
      else if (data.current) confirm(data.current);
    }
    if (!op) discardedOutcome(type, data);
    if (!op && data.idempotency_key) departures.noteUnmatched(data.idempotency_key, type, data.reason);
    changed();
    return { applied: true, op };
  }

  /**
   * Replace the confirmed state with a snapshot and keep every pending op folded on top
   * (read-your-own-writes across a refresh).
   *
   * `outcomes` are the status-endpoint answers for pending ops, read after the snapshot:
   * an op whose event is already inside the snapshot (event_id <= its watermark) will
   * never be streamed to us, so it is settled (or failed) here, in the same step as the
   * snapshot, with no frame showing it applied twice (a like counted double) or not at all.
   *
   * A snapshot older than what we hold is refused unless `force` (the stream was closed
   * while it was fetched, or the server said `reset`).
   * @returns {boolean} whether it was loaded
   */
  function loadSnapshot({ tasks, watermark: snapshotWatermark }, { outcomes = [], force = false } = {}) {
    if (!force && snapshotWatermark < watermark) return false;
    const before = base;
    // A deleted task's id in a snapshot taken after its delete is a new life of it
    // (created again by another client); in an older one it is the task as it was.
    const alive = tasks.filter((task) => {
      const deletedBy = deleted.get(task.id);
      if (deletedBy === undefined) return true;
      if (deletedBy > snapshotWatermark) return false;
      deleted.delete(task.id);
      return true;
    });
    base = new Map(alive.map((task) => [task.id, Object.freeze({ ...task })]));
    taskOrder.snapshot([...base.keys()], (id) => pending.of(id).some((op) => op.kind === 'create'));
    for (const [id, task] of before) if (!base.has(id)) goneTitles.set(id, task.title);
    // A conflict on a task gone meanwhile has nothing left to choose between.
    for (const id of [...conflicts.byTask.keys()]) {
      if (base.has(id)) conflicts.refresh(id, base.get(id));
      else conflicts.close(id);
    }
    watermark = snapshotWatermark;
    loaded = true;
    for (const outcome of outcomes) {
      const op = pending.find(outcome.key);
      if (outcome.event_id == null || outcome.event_id > snapshotWatermark) continue;
      // A discarded op whose event the snapshot holds (the stream will not send it).
      if (!op) discardedOutcome(outcome.status === 'settled' ? EVENT_SETTLED : EVENT_FAILED, { idempotency_key: outcome.key });
      if (!op) continue;
      if (outcome.status === 'settled') removeOp(op, 'settled');
      else if (outcome.status === 'failed') {
        failOp(op, { ...outcome.error, current: base.get(op.task_id) ?? null });
      }
    }
    // After the outcomes: a create of ours that they settle, on a task deleted since,
    // no longer keeps the ops made on it.
    for (const { task_id: taskId } of pending.all()) dropUnaccepted(taskId);
    changed();
    return true;
  }

  /**
   * Advance time: ops without an event after `stuckMs` since their last send go to
   * `checking` (or straight to `stuck` when no 202 ever came, as there is nothing to ask),
   * and the sync indicator's figures are recomputed.
   * @returns {object[]} ops that just entered `checking`: ask their status endpoint
   */
  function tick() {
    const at = now();
    const toCheck = [];
    let stateChanged = false;
    for (const op of pending.all()) {
      // One queued behind ours waits on them: past the timeout it is offered Retry and
      // Discard too (`overdue`), rather than wait unseen behind one never retried.
      const waiting = op.state === 'queued' ? !op.overdue : op.state === 'sending' || op.state === 'pending';
      if (!waiting) continue;
      if (at < op.sent_at) {
        // The clock was set back: how long the op has waited is not known. Its timeout
        // starts over, rather than waiting for the clock to come back to where it was.
        pending.replace(op, { sent_at: at });
      } else if (at - op.sent_at >= stuckMs) {
        if (op.state === 'queued') pending.replace(op, { overdue: true });
        else {
          const next = pending.replace(op, { state: op.command_id ? 'checking' : 'stuck' });
          if (next.state === 'checking') toCheck.push(next);
        }
        stateChanged = true;
      }
    }
    // Counted once: a tick changes ops' states, not which ops there are or their ages.
    const syncChanged = publisher.recountSync(pending.all(), at);
    if (stateChanged || syncChanged) publisher.publish();
    return toCheck;
  }

  /**
   * What the status endpoint said about an overdue op (`command` is its JSON, or null when
   * it could not be asked), with the task re-fetched when the command is no longer pending
   * (`task`: the row, or null on 404). Pending -> `stuck`: the view offers Retry/Discard.
   */
  function statusChecked(key, command, task) {
    const op = pending.find(key);
    if (!op) return;
    if (op.kind === 'create' && command?.accepted_at) taskOrder.created(op.task_id, command.accepted_at);
    if (command?.status === 'settled') {
      if (task) confirm(task);
      else if (task === null && op.kind === 'delete') forget(op.task_id, { tombstone: command.event_id ?? true });
      removeOp(op, 'settled');
    } else if (command?.status === 'failed') {
      failOp(op, { ...(command.error ?? { reason: 'failed' }), current: task ?? null });
    } else {
      pending.replace(op, { state: 'stuck' });
    }
    changed();
  }

  /** Discard: stop waiting for an op. The server may still apply it; then it shows as any change would. */
  function discard(key) {
    const op = pending.find(key);
    if (!op) return;
    const title = titleOf(op);
    // A create that never applied takes the changes stacked on it along: without its row
    // they could be neither shown nor retried nor discarded.
    const along = op.kind === 'create' && !base.has(op.task_id)
      ? pending.of(op.task_id).filter((other) => other !== op) : [];
    for (const key of [op, ...along].map((each) => each.key)) {
      // Found again: removing one may send the next (send-order.js), which replaces it.
      const gone = pending.find(key);
      const goneTitle = titleOf(gone);
      removeOp(gone, 'discarded');
      // Even one whose 202 has not come: its request may have reached the server.
      departures.noteDiscarded(gone, goneTitle);
    }
    notices.add(noticeOf(op, 'info', 'discarded', discardText(op, title, along.length)));
    changed();
  }

  /** The event of an op the user stopped waiting for: applied after all, it says so. */
  function discardedOutcome(type, data) {
    const op = data.idempotency_key && departures.takeDiscarded(data.idempotency_key);
    if (!op || type !== EVENT_SETTLED) return;
    departures.depart(op, 'applied_late');
    notices.add(noticeOf(op, 'info', 'applied_late', appliedLateText(op)));
  }

  /** Ground truth from GET /api/tasks/{id} (`null` on 404). Only moves forward. */
  function taskFetched(taskId, task) {
    if (task) {
      if (confirm(task)) changed();
    } else if (base.has(taskId)) {
      forget(taskId, { tombstone: false });
      changed();
    }
  }

  /**
   * Ground truth from the counts fragment GET /api/tasks/{id}/counts.
   * @returns {'applied'|'stale'|'newer'|'missing'} `newer`: the row moved on, fetch it whole
   *   (copying likes alone would leave an older title under a newer version).
   */
  function countsFetched({ id, likes, version }) {
    const known = base.get(id);
    if (!known) return 'missing';
    if (version < known.version) return 'stale';
    if (version > known.version) return 'newer';
    if (known.likes !== likes) {
      base.set(id, Object.freeze({ ...known, likes }));
      changed();
    }
    return 'applied';
  }

  /**
   * Close a conflict. `mine` returns the intent to re-submit the user's change on the
   * current version (the caller gives it a new key: it is a new intent); `theirs` drops it.
   */
  function resolveConflict(taskId, choice) {
    const conflict = conflicts.close(taskId);
    if (!conflict) return null;
    // Its notice goes with it: the choice made, there is nothing left to tell.
    notices.dropConflict(taskId);
    changed();
    if (choice !== 'mine') return null;
    const intent = { kind: conflict.kind, task_id: taskId, ...editBase(taskId) };
    if (conflict.kind === 'update') intent.patch = { ...conflict.yours };
    return intent;
  }

  /**
   * What an edit opened now is made on: the confirmed version (0 before the task's create
   * settles) and the values the user is shown. An editor takes it when it opens, so a
   * change by someone else while it is open conflicts; the user's own changes meanwhile
   * are counted when the edit goes out (send-order.js).
   */
  function editBase(taskId) {
    return { base_version: base.get(taskId)?.version ?? 0, seen: seenNow(taskId) };
  }


  /** Dismiss the notice `id`, or every notice when `id` is omitted. */
  function dismissNotice(id) {
    if (notices.dismiss(id)) changed();
  }

  function setConnection(state) {
    if (state !== connection) {
      connection = state;
      changed();
    }
  }

  /** Every pending op, in issue order across tasks, in the shape `restore` takes back. */
  function persistedOps() {
    return pending.all()
      .sort((a, b) => a.issued_at - b.issued_at)
      .map(persistedFields);
  }

  /**
   * Put back ops persisted before a reload. Their timeouts start over now; an op that had
   * its 202 is `pending`, one that had not is `sending` (the caller re-sends it, same key).
   * `known`: key -> `{type, reason}` for ops the caller knows are done (the status endpoint
   * said so); they leave at once, settled or failed, and never show as pending.
   */
  function restore(saved, known = new Map()) {
    const at = now();
    for (const fields of saved) {
      if (!isSavedOp(fields) || pending.find(fields.key) || departures.hasLeft(fields.key)) continue;
      const seen = departures.outcomeOf(fields.key) ?? known.get(fields.key);
      if (seen) {
        // Its event came before it did (an op taken over from a tab that closed), or its
        // status says it is done (`known`: {type, reason}, as an event would).
        const outcome = seen.type === EVENT_SETTLED ? 'settled' : 'failed';
        departures.depart(Object.freeze({ ...fields }), outcome, seen.reason);
        continue;
      }
      // Queued before the reload: never sent, it still waits for the ops ahead of it.
      const queued = fields.made_on != null && fields.base_version == null;
      pushOp(Object.freeze({
        ...fields,
        patch: fields.patch && Object.freeze({ ...fields.patch }),
        command_id: fields.command_id ?? null,
        state: queued ? 'queued' : fields.command_id ? 'pending' : 'sending',
        sent_at: at,
      }));
    }
    // The ops ahead of one may have been left out (done meanwhile): its turn may have come.
    for (const taskId of new Set(saved.map((fields) => fields?.task_id))) if (taskId) sendOrder.sendQueued(taskId);
    changed();
  }

  /** Put back conflicts persisted before a reload (`persistedConflicts`). */
  function restoreConflicts(saved) {
    if (conflicts.restore(saved)) changed();
  }

  /**
   * The immutable state for rendering. Same object until something changes, as
   * useSyncExternalStore requires.
   */
  function getSnapshot() {
    return publisher.getSnapshot(() => ({
      order: taskOrder.ids,
      base,
      pending,
      conflicts: conflicts.byTask,
      fields: { notices: notices.list, watermark, loaded, connection, pending_count: pending.size, window_samples: windowSamples },
    }));
  }

  return {
    subscribe: publisher.subscribe,
    getSnapshot,
    issue,
    accepted,
    resending,
    /**
     * Retry of an edit or a delete queued behind ours past the timeout (send-order.js).
     * @returns {object[]} the ops ahead that it still waits for, for the caller to send
     *   again; none when it went
     */
    sendNow(key) {
      const { waitFor, sent } = sendOrder.sendNow(key);
      if (sent) changed();
      return waitFor;
    },
    unreached,
    rejected,
    applyEvent,
    loadSnapshot,
    tick,
    statusChecked,
    discard,
    taskFetched,
    countsFetched,
    resolveConflict,
    editBase,
    takeOutbox: sendOrder.takeOutbox,
    /** How ops left their stacks since the last call, in order (departures.js). */
    takeDeparted: departures.takeDeparted,
    dismissNotice,
    setConnection,
    persistedOps,
    restore,
    /** The open conflicts, in the shape `restoreConflicts` takes back after a reload. */
    persistedConflicts: conflicts.persisted,
    restoreConflicts,
    persistedDiscarded: departures.persistedDiscarded,
    restoreDiscarded: departures.restoreDiscarded,
    getOp: (key) => pending.find(key),
    /** Whether the op of this key is on a stack here, or was and left (`restore` skips both). */
    holds: (key) => Boolean(pending.find(key)) || departures.hasLeft(key),
    /** Every pending op, flat (for the transport: re-send, status checks). */
    pendingOps: () => pending.all(),
    get watermark() {
      return watermark;
    },
    /** The confirmed (not predicted) task, for tests and re-fetch decisions. */
    confirmedTask: (taskId) => base.get(taskId) ?? null,
    /** Whether a settled delete of the task was seen: there is nothing to fetch. */
    isDeleted: (taskId) => deleted.has(taskId),
  };
}
