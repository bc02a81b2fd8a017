// Operations: one user intent on its way to the server, and all that can be said of one
// without the core's state: the request that carries it (`commandRequest`), what it
// predicts (`applyOp`, `fold`, and the list's row of a task with its stack, `itemOf`),
// how it is named to the user (`describeOp`, and its notices: `noticeOf` and the texts),
// and what of it survives a reload (`persistedFields`, `isSavedOp`).
//
// Pure: no state, no DOM, no time. The core (core.js) keeps the stacks of them.

/** Operation kinds, as the server names them in command records and events. */
export const KINDS = Object.freeze(['create', 'update', 'delete', 'like']);

/**
 * Life of an operation on the client:
 * - `sending`:  issued, no 202 yet (or being re-sent by Retry);
 * - `pending`:  202 received, waiting for its event;
 * - `checking`: no event after `stuckMs`, the command's status endpoint is being asked;
 * - `stuck`:    still pending on the server after the check, or never accepted (with
 *               `unreached` when every attempt to send it failed): the view offers
 *               Retry (same key) and Discard.
 * A settled or failed operation leaves the stack; it has no state of its own.
 */
export const OP_STATES = Object.freeze(['sending', 'pending', 'checking', 'stuck']);

/**
 * Answers that say "not now" (a duplicate's accept in progress, a full backlog, a gateway
 * that cannot reach the server): an op refused with one goes again by itself, as one
 * that found no answer does. Any other 5xx waits for the user's Retry.
 */
const RESENT_STATUSES = new Set([409, 502, 503, 504]);

/** Whether an op whose attempts all failed (`unreached`) is sent again without a click. */
export function resentByItself(unreached) {
  return Boolean(unreached) && (unreached.offline || RESENT_STATUSES.has(unreached.status));
}

export const EVENT_SETTLED = 'projection:settled';
export const EVENT_FAILED = 'command:failed';
export const EVENT_RESET = 'reset';

/**
 * The HTTP request that carries an operation. Deterministic: a retry under the same
 * idempotency key must send the very same body, or the server answers 422.
 * @returns {{method: string, path: string, body: object | null}}
 */
export function commandRequest(op) {
  const taskPath = `/api/tasks/${encodeURIComponent(op.task_id)}`;
  switch (op.kind) {
    case 'create': {
      const body = { id: op.task_id, title: op.title };
      if (op.notes) body.notes = op.notes;
      return { method: 'POST', path: '/api/tasks', body };
    }
    case 'update': {
      const body = { ...op.patch };
      if (op.base_version != null) body.base_version = op.base_version;
      return { method: 'PATCH', path: taskPath, body };
    }
    case 'delete':
      return {
        method: 'DELETE',
        path: taskPath,
        body: op.base_version != null ? { base_version: op.base_version } : null,
      };
    case 'like':
      return { method: 'POST', path: `${taskPath}/likes`, body: { delta: op.delta } };
    default:
      throw new Error(`unknown operation kind ${op.kind}`);
  }
}

/** One pending operation applied to a task (or to its absence, `null`). */
export function applyOp(task, op) {
  switch (op.kind) {
    case 'create':
      // A create whose row is already confirmed (its event or a snapshot came first)
      // predicts nothing more.
      return task ?? {
        id: op.task_id,
        title: op.title,
        notes: op.notes ?? '',
        done: false,
        likes: 0,
        version: 0,
        updated_at: null,
      };
    case 'update':
      return task && { ...task, ...op.patch };
    case 'delete':
      // The row stays until the delete's event takes it away (`itemOf` marks it deleting).
      return task;
    case 'like':
      return task && { ...task, likes: task.likes + op.delta };
    default:
      return task;
  }
}

/** view(id): the pending operations folded, in issue order, over the confirmed task. */
export function fold(confirmed, ops) {
  let task = confirmed ?? null;
  for (const op of ops) task = applyOp(task, op);
  return task;
}

/** A short human description of an operation, for notices and the stuck view. */
export function describeOp(op, title) {
  const name = `“${title ?? op.title ?? 'task'}”`;
  switch (op.kind) {
    case 'create':
      return `Create ${name}`;
    case 'update': {
      const parts = [];
      if ('title' in op.patch) parts.push(`rename ${name} to “${op.patch.title}”`);
      if ('notes' in op.patch) parts.push(`edit the notes of ${name}`);
      if ('done' in op.patch) parts.push(`mark ${name} ${op.patch.done ? 'done' : 'not done'}`);
      const text = parts.join(', ') || `edit ${name}`;
      return text[0].toUpperCase() + text.slice(1);
    }
    case 'delete':
      return `Delete ${name}`;
    case 'like':
      return op.compensating
        ? `The ${op.delta > 0 ? 'like' : 'unlike'} of ${name} that the page sent to match your last click`
        : `${op.delta > 0 ? 'Like' : 'Unlike'} ${name}`;
    default:
      return `Change ${name}`;
  }
}

/**
 * One task as the list shows it: `ops` (its stack) folded over `confirmed` (null when
 * the server has no row yet), with each op's state and description, and its open
 * conflict. Null when nothing is left to show (deleted, or a create that never applied).
 */
export function itemOf(id, confirmed, ops, conflict) {
  // A delete shows at once as the row being deleted, marked pending like any other op,
  // until its event takes the row away or its failure restores it: a row gone at the
  // click would look confirmed. Its stuck view has a row to offer Retry and Discard on.
  const deleting = ops.some((op) => op.kind === 'delete');
  const task = fold(confirmed, ops);
  return task && Object.freeze({
    id,
    task: Object.freeze(task),
    confirmed,
    deleting,
    pending: ops.length > 0,
    ops: Object.freeze(ops.map((op) => Object.freeze({
      key: op.key,
      kind: op.kind,
      delta: op.delta,
      state: op.state,
      // Queued behind ours past the timeout: offered Retry and Discard as a stuck one is.
      overdue: Boolean(op.overdue),
      // Whether the server took it (a 202): a stuck op it took is still processing there.
      accepted: Boolean(op.command_id),
      unreached: op.unreached,
      issued_at: op.issued_at,
      description: describeOp(op, confirmed?.title ?? task.title),
    }))),
    conflict,
  });
}

/** The fields of an operation that survive a page reload (see the core's `restore`). */
const PERSISTED_FIELDS = Object.freeze([
  'key', 'command_id', 'task_id', 'kind', 'title', 'notes', 'patch', 'delta', 'base_version',
  'made_on', 'seen', 'rebased', 'named', 'issued_at', 'compensating', 'accepted_at',
]);

/** An op in the shape that is stored across a reload: its persisted fields that are set. */
export function persistedFields(op) {
  return Object.fromEntries(PERSISTED_FIELDS.filter((field) => op[field] !== undefined).map((field) => [field, op[field]]));
}

/** Whether a stored op (from this build or an older one) can be put back: key, task, kind. */
export function isSavedOp(fields) {
  return Boolean(fields?.key && fields.task_id && KINDS.includes(fields.kind));
}

const REASON_TEXT = Object.freeze({
  not_found: 'the task no longer exists',
  conflict: 'someone else changed it first',
  injected: 'the server rejected it (injected failure)',
  dead_lettered: 'the server gave up after repeated faults',
});
/**
 * Reasons whose server message says more than REASON_TEXT (which fault). Not a conflict:
 * its yours / theirs view says what changed, where the message's versions are jargon.
 */
const REASON_WITH_DETAIL = new Set(['dead_lettered']);

/** A notice about one op: what it says, and the op's task and kind. */
export function noticeOf(op, level, reason, text) {
  return { level, task_id: op.task_id, op_kind: op.kind, delta: op.delta, reason, text };
}

/**
 * What a failed op's notice says. `orphaned`: a change to a task whose create failed;
 * `keptMoving`: an edit re-sent on newer versions until it gave up (the core's `rebase`).
 */
export function failureText(op, title, { reason, message, orphaned = false, keptMoving = false }) {
  if (orphaned) return `${describeOp(op, title)} was dropped: creating the task failed.`;
  if (keptMoving) {
    return `${describeOp(op, title)} was not applied: the task kept changing while it was sent `
      + `(likes, or other changes to it), ${(op.rebased ?? 0) + 1} times. Nothing was overwritten.`;
  }
  const why = REASON_TEXT[reason] ?? reason;
  const detail = message && (REASON_WITH_DETAIL.has(reason) || !REASON_TEXT[reason]) ? ` (${message})` : '';
  return `${describeOp(op, title)} failed: ${why}.${detail}`;
}

/** What the notice of an op the server refused before accepting it (a 4xx) says. */
export function refusedText(op, title, { status, detail }) {
  return `${describeOp(op, title)} was refused: ${detail || `HTTP ${status}`}.`;
}

/**
 * What a like the server applies after a Discard turns into: the page keeps this
 * browser's likes where the user's clicks left them (likes.js), so it is taken back
 * unless a later click wants it.
 */
const LIKE_SET_BACK = 'the page sets the like back to where your clicks left it';

/** What the notice of a discarded op that the server applied after all says. */
export function appliedLateText(op) {
  const text = `${describeOp(op, op.title_then)}, which you stopped waiting for, was applied after all`;
  return op.kind === 'like' ? `${text}: ${LIKE_SET_BACK}.` : `${text}.`;
}

/** What the notice of a Discard says; `along`: how many changes stacked on a create went with it. */
export function discardText(op, title, along) {
  return along
    ? `${describeOp(op, title)} and ${along === 1 ? 'a change' : `${along} changes`} made to it: `
      + 'stopped waiting. If the server applies them later, they will show up.'
    : `${describeOp(op, title)}: stopped waiting. If the server applies it later, `
      + `${op.kind === 'like' ? LIKE_SET_BACK : op.kind === 'delete' ? 'the task will go then' : 'it will show up'}.`;
}
