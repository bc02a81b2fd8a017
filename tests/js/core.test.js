// Unit tests of the pure client core: composition, acknowledgements in any order,
// rollback of one op among several, rebase over snapshots, watermark, timeouts, conflicts,
// snapshot identity.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';

import { createCore } from '../../static/core.js';
import { commandRequest, fold, EVENT_SETTLED, EVENT_FAILED } from '../../static/ops.js';

/** A controllable clock. */
function clock(start = 1_000_000) {
  let time = start;
  return { now: () => time, advance: (ms) => { time += ms; } };
}

function task(id, fields = {}) {
  return { id, title: `task ${id}`, notes: '', done: false, likes: 0, version: 1, updated_at: '2025-01-01T00:00:00Z', ...fields };
}

/**
 * A core where `ahead` was issued, then edits `[key, task_id, patch]` queued behind it,
 * and the timeout has passed: the edits are overdue, nothing is in the outbox.
 */
function overdueBehind(ahead, ...edits) {
  const { core, time } = setup();
  core.issue(ahead);
  for (const [key, taskId, patch] of edits) core.issue({ kind: 'update', key, task_id: taskId, patch, ...core.editBase(taskId) });
  core.takeOutbox();
  time.advance(5000);
  core.tick();
  return { core, time };
}

/** A core with tasks a, b, c confirmed at watermark 10. */
function setup(options = {}) {
  const time = clock();
  const core = createCore({ now: time.now, stuckMs: 5000, syncMs: 800, ...options });
  core.loadSnapshot({ tasks: [task('a'), task('b', { likes: 3, version: 4 }), task('c')], watermark: 10 });
  return { core, time };
}

let nextEventId = 11;
function settled(op, taskAfter, { id = nextEventId++ } = {}) {
  return {
    id,
    type: EVENT_SETTLED,
    data: {
      command_id: op.command_id ?? `cmd-${op.key}`,
      idempotency_key: op.key,
      task_id: op.task_id,
      kind: op.kind,
      version: taskAfter?.version ?? 0,
      task: taskAfter,
      window_ms: 700,
    },
  };
}
function failed(op, reason, current, { id = nextEventId++ } = {}) {
  return {
    id,
    type: EVENT_FAILED,
    data: {
      command_id: op.command_id ?? `cmd-${op.key}`,
      idempotency_key: op.key,
      task_id: op.task_id,
      kind: op.kind,
      reason,
      message: `it ${reason}`,
      current,
    },
  };
}

const item = (core, id) => core.getSnapshot().items.find((candidate) => candidate.id === id);
const ids = (core) => core.getSnapshot().items.map((candidate) => candidate.id);

describe('composition of pending operations over the confirmed base', () => {
  test('a create shows at once, pending, appended after the snapshot order', () => {
    const { core } = setup();
    core.issue({ kind: 'create', key: 'k1', task_id: 'n', title: 'new one' });
    assert.deepEqual(ids(core), ['a', 'b', 'c', 'n']);
    const created = item(core, 'n');
    assert.equal(created.task.title, 'new one');
    assert.equal(created.pending, true);
    assert.equal(created.confirmed, null);
  });

  test('rapid like, unlike, like compose deltas over the base', () => {
    const { core } = setup();
    core.issue({ kind: 'like', key: 'l1', task_id: 'b', delta: 1 });
    core.issue({ kind: 'like', key: 'l2', task_id: 'b', delta: -1 });
    core.issue({ kind: 'like', key: 'l3', task_id: 'b', delta: 1 });
    assert.equal(item(core, 'b').task.likes, 4);
    assert.equal(item(core, 'b').confirmed.likes, 3);
  });

  test('patches fold in issue order; a delete shows its row as being deleted until it settles', () => {
    const { core } = setup();
    core.issue({ kind: 'update', key: 'u1', task_id: 'a', patch: { title: 'first' } });
    core.issue({ kind: 'update', key: 'u2', task_id: 'a', patch: { title: 'second', done: true } });
    assert.equal(item(core, 'a').task.title, 'second');
    assert.equal(item(core, 'a').task.done, true);
    assert.equal(item(core, 'a').deleting, false);
    const remove = core.issue({ kind: 'delete', key: 'd1', task_id: 'c' });
    assert.deepEqual(ids(core), ['a', 'b', 'c'], 'not gone before its event: that would look confirmed');
    assert.deepEqual([item(core, 'c').deleting, item(core, 'c').pending, item(core, 'c').task.title], [true, true, 'task c']);
    core.applyEvent(settled(remove, null));
    assert.deepEqual(ids(core), ['a', 'b']);
  });

  test('fold ignores edits of a task that does not exist', () => {
    assert.equal(fold(null, [{ kind: 'update', task_id: 'x', patch: { title: 't' } }]), null);
    assert.equal(fold(null, [{ kind: 'like', task_id: 'x', delta: 1 }]), null);
  });

  test('issuing the same key twice is one operation (double click, double Enter)', () => {
    const { core } = setup();
    const first = core.issue({ kind: 'create', key: 'same', task_id: 'n', title: 'once' });
    const second = core.issue({ kind: 'create', key: 'same', task_id: 'n', title: 'once' });
    assert.equal(first, second);
    assert.equal(core.pendingOps().length, 1);
    assert.deepEqual(ids(core), ['a', 'b', 'c', 'n']);
    assert.deepEqual(core.takeOutbox().map((op) => op.key), ['same'], 'put out to be sent once');
  });
});

describe('acknowledgements', () => {
  test('settle events in any order leave the confirmed end state', () => {
    const { core } = setup();
    const ops = [1, -1, 1].map((delta, index) => core.issue({ kind: 'like', key: `l${index}`, task_id: 'b', delta }));
    // The server applied them in order: likes 4 (v5), 3 (v6), 4 (v7); the events reach us reordered
    // only in the sense of which op they settle, ids stay increasing.
    core.applyEvent(settled(ops[2], task('b', { likes: 4, version: 7 }), { id: 20 }));
    assert.equal(item(core, 'b').task.likes, 4 + 1 - 1 + 0, 'two ops still pending over base 4');
    core.applyEvent(settled(ops[0], task('b', { likes: 4, version: 5 }), { id: 21 }));
    assert.equal(item(core, 'b').confirmed.version, 7, 'an older version never overwrites a newer base');
    assert.equal(item(core, 'b').task.likes, 3, 'the remaining unlike still folds');
    core.applyEvent(settled(ops[1], task('b', { likes: 3, version: 6 }), { id: 22 }));
    const final = item(core, 'b');
    assert.equal(final.pending, false);
    assert.equal(final.task.likes, 4);
    assert.equal(core.pendingOps().length, 0);
  });

  test('a settled event matches its op by idempotency key even before the 202 arrives', () => {
    const { core } = setup();
    const op = core.issue({ kind: 'create', key: 'early', task_id: 'n', title: 'fast' });
    core.applyEvent(settled(op, task('n', { title: 'fast' })));
    assert.equal(item(core, 'n').pending, false);
    core.accepted('early', { command_id: 'late-202' }); // no op any more: a no-op
    assert.equal(core.pendingOps().length, 0);
  });

  test('events from others update the base and append creates', () => {
    const { core } = setup();
    core.applyEvent(settled({ key: 'theirs', task_id: 'z', kind: 'create' }, task('z', { title: 'from tab 2' })));
    assert.deepEqual(ids(core), ['a', 'b', 'c', 'z']);
    assert.equal(item(core, 'z').pending, false);
  });

  test('a settled delete removes the task for good, even against a late re-fetch', () => {
    const { core } = setup();
    const op = core.issue({ kind: 'delete', key: 'd', task_id: 'a' });
    core.applyEvent(settled(op, null));
    assert.deepEqual(ids(core), ['b', 'c']);
    core.taskFetched('a', task('a', { version: 1 }));
    assert.deepEqual(ids(core), ['b', 'c']);
  });

  test("a deleted task's id created again (by another client) is a new task, at version 1", () => {
    const { core } = setup();
    const op = core.issue({ kind: 'delete', key: 'd', task_id: 'b' });
    core.applyEvent(settled(op, null));
    core.applyEvent(settled({ key: 'again', task_id: 'b', kind: 'create' }, task('b', { title: 'b again' })));
    assert.deepEqual(ids(core), ['a', 'c', 'b']);
    assert.deepEqual([item(core, 'b').task.title, item(core, 'b').task.version], ['b again', 1]);
  });

  test("a snapshot taken after a task's delete shows its id's new life; an older one does not bring it back", () => {
    const { core } = setup();
    const op = core.issue({ kind: 'delete', key: 'd', task_id: 'b' });
    core.applyEvent(settled(op, null, { id: 50 }));
    const again = task('b', { title: 'b again' });
    // Forced, as after a reset: a snapshot from before the delete.
    core.loadSnapshot({ tasks: [task('a'), task('b', { version: 4 }), task('c')], watermark: 49 }, { force: true });
    assert.deepEqual(ids(core), ['a', 'c']);
    core.loadSnapshot({ tasks: [task('a'), task('c'), again], watermark: 60 });
    assert.deepEqual(ids(core), ['a', 'c', 'b']);
    assert.equal(item(core, 'b').task.title, 'b again');
    assert.equal(core.isDeleted('b'), false);
  });
});

describe('failure removes only the failed operation', () => {
  test('one failed like among several: the others survive and recompose', () => {
    const { core } = setup();
    const ops = [1, 1, 1].map((delta, index) => core.issue({ kind: 'like', key: `l${index}`, task_id: 'b', delta }));
    assert.equal(item(core, 'b').task.likes, 6);
    core.applyEvent(failed(ops[1], 'injected', task('b', { likes: 3, version: 4 })));
    assert.equal(item(core, 'b').task.likes, 5);
    assert.deepEqual(item(core, 'b').ops.map((op) => op.key), ['l0', 'l2']);
    const [notice] = core.getSnapshot().notices;
    assert.match(notice.text, /Like “task b” failed: the server rejected it/);
    assert.equal(notice.reason, 'injected');
  });

  test('ops on a task whose create failed are named by its title and say why they were dropped', () => {
    const { core } = setup();
    const create = core.issue({ kind: 'create', key: 'c1', task_id: 'n', title: 'doomed' });
    const like = core.issue({ kind: 'like', key: 'l1', task_id: 'n', delta: 1 });
    core.applyEvent(failed(create, 'injected', null));
    assert.equal(item(core, 'n'), undefined, 'the predicted row is gone with its create');
    core.applyEvent(failed(like, 'not_found', null));
    assert.deepEqual(core.getSnapshot().notices.map((notice) => notice.text), [
      'Create “doomed” failed: the server rejected it (injected failure).',
      'Like “doomed” was dropped: creating the task failed.',
    ]);
    // Only while its ops are pending: a later, unrelated not_found reads as usual.
    const other = core.issue({ kind: 'like', key: 'l2', task_id: 'n', delta: 1 });
    core.applyEvent(failed(other, 'not_found', null));
    assert.match(core.getSnapshot().notices.at(-1).text, /failed: the task no longer exists\.$/);
  });

  test('a discarded op of a failed create leaves no trace that would rename later failures', () => {
    const { core } = setup();
    const create = core.issue({ kind: 'create', key: 'c1', task_id: 'n', title: 'doomed' });
    const like = core.issue({ kind: 'like', key: 'l1', task_id: 'n', delta: 1 });
    core.applyEvent(failed(create, 'injected', null));
    core.discard(like.key);
    const later = core.issue({ kind: 'like', key: 'l2', task_id: 'n', delta: 1 });
    core.applyEvent(failed(later, 'not_found', null));
    assert.match(core.getSnapshot().notices.at(-1).text, /failed: the task no longer exists\.$/);
  });

  test('a notice names a task by its title, also once it is gone or never was', () => {
    const { core } = setup();
    const like = core.issue({ kind: 'like', key: 'l', task_id: 'c', delta: 1 });
    core.applyEvent(settled({ key: 'elsewhere', task_id: 'c', kind: 'delete' }, null));
    core.applyEvent(failed(like, 'not_found', null));
    assert.equal(core.getSnapshot().notices.at(-1).text, 'Like “task c” failed: the task no longer exists.');

    const create = core.issue({ kind: 'create', key: 'k', task_id: 'n', title: 'FC' });
    const rename = core.issue({ kind: 'update', key: 'r', task_id: 'n', patch: { title: 'FC2' }, ...core.editBase('n') });
    core.applyEvent(failed(create, 'injected', null));
    core.applyEvent(failed(rename, 'not_found', null));
    assert.deepEqual(core.getSnapshot().notices.slice(-2).map((notice) => notice.text), [
      'Create “FC” failed: the server rejected it (injected failure).',
      'Rename “FC” to “FC2” was dropped: creating the task failed.',
    ]);

    // After a reload on a snapshot that no longer has the task: the name it had then.
    const remove = core.issue({ kind: 'delete', key: 'd', task_id: 'a' });
    const reloaded = createCore({ now: () => 2_000_000 });
    reloaded.loadSnapshot({ tasks: [], watermark: 30 });
    reloaded.restore(JSON.parse(JSON.stringify(core.persistedOps())));
    reloaded.applyEvent(failed(remove, 'not_found', null, { id: 31 }));
    assert.equal(reloaded.getSnapshot().notices.at(-1).text, 'Delete “task a” failed: the task no longer exists.');
  });

  test("a like the page sent by itself says so when it fails, and keeps saying so after a reload", () => {
    const { core } = setup();
    const op = core.issue({ kind: 'like', key: 'c', task_id: 'b', delta: -1, compensating: true });
    const reloaded = createCore({ now: () => 2_000_000 });
    reloaded.loadSnapshot({ tasks: [task('b', { likes: 3, version: 4 })], watermark: 10 });
    reloaded.restore(JSON.parse(JSON.stringify(core.persistedOps())));
    for (const which of [core, reloaded]) {
      which.applyEvent(failed(op, 'injected', task('b', { likes: 3, version: 4 }), { id: 40 }));
      assert.match(which.getSnapshot().notices.at(-1).text,
        /^The unlike of “task b” that the page sent to match your last click failed: /);
    }
    assert.equal(core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'x' }, compensating: true }).compensating, undefined,
      'only likes are sent by the page itself');
  });

  test('a like the page sent by itself on a task deleted meanwhile fails without a notice; a clicked one has one', () => {
    const { core } = setup();
    // Another tab deletes the task while both likes are on their way.
    const clicked = core.issue({ kind: 'like', key: 'l', task_id: 'b', delta: 1 });
    const page = core.issue({ kind: 'like', key: 'c', task_id: 'b', delta: -1, compensating: true });
    core.accepted('l', { command_id: 'cmd-l' });
    core.accepted('c', { command_id: 'cmd-c' });
    core.applyEvent(failed(clicked, 'not_found', null, { id: 12 }));
    core.applyEvent(failed(page, 'not_found', null, { id: 13 }));
    assert.deepEqual(core.getSnapshot().notices.map((notice) => notice.text), ['Like “task b” failed: the task no longer exists.']);
    assert.deepEqual([core.pendingOps().length, core.getSnapshot().items.some((item) => item.id === 'b')], [0, false]);
  });

  test('ops the server never took on a task deleted elsewhere fail as not_found; one it took waits for its event', () => {
    const { core } = setup();
    core.issue({ kind: 'like', key: 'refused', task_id: 'a', delta: 1 });
    core.unreached('refused', { offline: false, detail: '503: overloaded' });
    const taken = core.issue({ kind: 'update', key: 'taken', task_id: 'a', patch: { done: true } });
    core.accepted('taken', { command_id: 'cmd-taken' });
    core.issue({ kind: 'like', key: 'page', task_id: 'a', delta: -1, compensating: true });
    // Someone else's delete of the task settles.
    core.applyEvent({
      id: 20,
      type: EVENT_SETTLED,
      data: { command_id: 'theirs', idempotency_key: 'their-key', task_id: 'a', kind: 'delete', version: 2, task: null },
    });
    assert.deepEqual(core.pendingOps().map((op) => op.key), ['taken']);
    assert.deepEqual(core.getSnapshot().notices.map((notice) => notice.text), ['Like “task a” failed: the task no longer exists.']);
    assert.deepEqual(core.takeDeparted().map(({ op, outcome, reason }) => [op.key, outcome, reason]),
      [['refused', 'failed', 'not_found'], ['page', 'failed', 'not_found']]);

    core.applyEvent(failed(taken, 'not_found', null, { id: 21 }));
    assert.deepEqual([core.pendingOps().length, core.getSnapshot().sync.count], [0, 0]);
  });

  test('a delete of ours whose event comes before its 202 leaves once, as settled, without a notice', () => {
    const { core } = setup();
    core.takeDeparted();
    const remove = core.issue({ kind: 'delete', key: 'd', task_id: 'a', base_version: 1 });
    core.issue({ kind: 'like', key: 'l', task_id: 'a', delta: 1 }); // queued behind it, never sent
    core.applyEvent(settled(remove, null, { id: 30 }));
    assert.deepEqual(core.takeDeparted().map(({ op, outcome, reason }) => [op.key, outcome, reason]),
      [['d', 'settled', undefined], ['l', 'failed', 'not_found']]);
    assert.deepEqual(core.getSnapshot().notices.map((notice) => notice.text), ['Like “task a” failed: the task no longer exists.']);
    assert.deepEqual(core.getSnapshot().window_samples.length, 1);
  });

  test('after a create that failed, the ops never sent on its task say why, as those sent do', () => {
    const { core } = setup();
    const create = core.issue({ kind: 'create', key: 'c', task_id: 'n', title: 'new one' });
    core.accepted('c', { command_id: 'cmd-c' });
    const sent = core.issue({ kind: 'like', key: 'l1', task_id: 'n', delta: 1 });
    core.accepted('l1', { command_id: 'cmd-l1' });
    core.issue({ kind: 'like', key: 'l2', task_id: 'n', delta: -1 });
    core.unreached('l2', { offline: false, detail: '503: overloaded' });
    core.applyEvent(failed(create, 'injected', null, { id: 30 }));
    core.applyEvent(failed(sent, 'not_found', null, { id: 31 }));
    assert.deepEqual(core.pendingOps(), []);
    assert.deepEqual(core.getSnapshot().notices.map((notice) => notice.text).slice(1), [
      'Unlike “new one” was dropped: creating the task failed.',
      'Like “new one” was dropped: creating the task failed.',
    ]);
  });

  test('a snapshot whose outcomes settle our create of a task deleted since fails the ops never sent on it', () => {
    const { core } = setup();
    core.issue({ kind: 'create', key: 'c', task_id: 'n', title: 'new one' });
    core.accepted('c', { command_id: 'cmd-c' });
    core.issue({ kind: 'like', key: 'l', task_id: 'n', delta: 1 });
    core.unreached('l', { offline: true, detail: 'network error' });
    core.loadSnapshot({ tasks: [task('a')], watermark: 40 }, { outcomes: [{ key: 'c', status: 'settled', event_id: 35 }] });
    assert.deepEqual(core.pendingOps(), []);
    assert.deepEqual(core.getSnapshot().notices.map((notice) => notice.text), ['Like “new one” failed: the task no longer exists.']);
  });

  test('a snapshot without the task fails the ops the server never took on it, not a create of ours', () => {
    const { core } = setup();
    core.issue({ kind: 'like', key: 'refused', task_id: 'c', delta: 1 });
    core.unreached('refused', { offline: true, detail: 'network error' });
    core.issue({ kind: 'create', key: 'new', task_id: 'n', title: 'new one' });
    core.issue({ kind: 'like', key: 'on-new', task_id: 'n', delta: 1 });
    core.loadSnapshot({ tasks: [task('a'), task('b', { likes: 3, version: 4 })], watermark: 30 });
    assert.deepEqual(core.pendingOps().map((op) => op.key), ['new', 'on-new']);
    assert.deepEqual(core.getSnapshot().notices.map((notice) => notice.text), ['Like “task c” failed: the task no longer exists.']);
  });

  test('the server message is shown where it says more than the reason', () => {
    const { core } = setup();
    const edit = core.issue({ kind: 'update', key: 'u1', task_id: 'a', patch: { title: 'x' }, base_version: 1 });
    core.applyEvent(failed(edit, 'conflict', task('a', { title: 'theirs', version: 2 })));
    // Not for a conflict: its yours / theirs view says what changed. Named by the title
    // the user renamed from, not theirs.
    assert.equal(core.getSnapshot().notices.at(-1).text, 'Rename “task a” to “x” failed: someone else changed it first.');
    core.resolveConflict('a', 'theirs');
    assert.equal(core.getSnapshot().notices.length, 0, 'the conflict settled, its notice goes');
    const like = core.issue({ kind: 'like', key: 'l1', task_id: 'b', delta: 1 });
    core.applyEvent(failed(like, 'dead_lettered', task('b', { likes: 3, version: 4 })));
    assert.equal(core.getSnapshot().notices.at(-1).text,
      'Like “task b” failed: the server gave up after repeated faults. (it dead_lettered)', 'a dead letter says which faults');
    const done = core.issue({ kind: 'update', key: 'd1', task_id: 'c', patch: { done: true } });
    core.applyEvent(failed(done, 'injected', task('c', { version: 2 })));
    assert.equal(core.getSnapshot().notices.at(-1).text, 'Mark “task c” done failed: the server rejected it (injected failure).',
      'an injected failure says it all without the message');
  });

  test('a failed create disappears with no orphan; a failed delete comes back in its place', () => {
    const { core } = setup();
    const create = core.issue({ kind: 'create', key: 'c1', task_id: 'n', title: 'doomed' });
    const remove = core.issue({ kind: 'delete', key: 'd1', task_id: 'b' });
    assert.deepEqual(ids(core), ['a', 'b', 'c', 'n']);
    assert.equal(item(core, 'b').deleting, true);
    core.applyEvent(failed(create, 'injected', null));
    core.applyEvent(failed(remove, 'injected', task('b', { likes: 3, version: 4 })));
    assert.deepEqual(ids(core), ['a', 'b', 'c']);
    assert.deepEqual([item(core, 'b').pending, item(core, 'b').deleting, item(core, 'b').task.likes], [false, false, 3]);
    assert.equal(core.getSnapshot().notices.length, 2);
  });

  test('a failed rename snaps back to the confirmed title', () => {
    const { core } = setup();
    const op = core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'new' } });
    core.applyEvent(failed(op, 'injected', task('a')));
    assert.equal(item(core, 'a').task.title, 'task a');
    assert.equal(item(core, 'a').pending, false);
  });

  test('a command refused with a 4xx never becomes pending and says why', () => {
    const { core } = setup();
    core.issue({ kind: 'create', key: 'bad', task_id: 'n', title: 'x'.repeat(300) });
    core.rejected('bad', { status: 422, detail: 'title must be 1 to 200 characters' });
    assert.deepEqual(ids(core), ['a', 'b', 'c']);
    assert.match(core.getSnapshot().notices[0].text, /refused: title must be 1 to 200/);
  });

  test('a failed like re-fetched from the counts fragment: same version applies, newer asks for the row', () => {
    const { core } = setup();
    assert.equal(core.countsFetched({ id: 'b', likes: 3, version: 4 }), 'applied');
    assert.equal(core.countsFetched({ id: 'b', likes: 9, version: 8 }), 'newer');
    assert.equal(core.countsFetched({ id: 'b', likes: 1, version: 2 }), 'stale');
    assert.equal(item(core, 'b').task.likes, 3);
  });
});

describe('snapshots and the watermark', () => {
  test('until a snapshot comes, the core says the list is not loaded: only pending creates are known', () => {
    const core = createCore({ now: () => 1_000_000 });
    core.restore([{ kind: 'create', key: 'c', task_id: 'n', title: 'mine', state: 'pending', issued_at: 999_000 }]);
    assert.deepEqual([core.getSnapshot().loaded, ids(core)], [false, ['n']]);
    assert.equal(core.loadSnapshot({ tasks: [task('a')], watermark: 3 }), true);
    assert.deepEqual([core.getSnapshot().loaded, ids(core)], [true, ['a', 'n']]);
    assert.equal(core.loadSnapshot({ tasks: [], watermark: 2 }), false, 'an older one is refused');
    assert.equal(core.getSnapshot().loaded, true);
  });

  test('pending ops are re-folded over a new snapshot (read-your-own-writes)', () => {
    const { core } = setup();
    core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'mine' } });
    core.issue({ kind: 'like', key: 'l', task_id: 'b', delta: 1 });
    core.issue({ kind: 'create', key: 'c', task_id: 'n', title: 'new' });
    core.loadSnapshot({ tasks: [task('a', { title: 'old', version: 2 }), task('b', { likes: 10, version: 9 }), task('c')], watermark: 30 });
    assert.equal(item(core, 'a').task.title, 'mine');
    assert.equal(item(core, 'b').task.likes, 11);
    assert.deepEqual(ids(core), ['a', 'b', 'c', 'n']);
    assert.equal(core.watermark, 30);
  });

  test('ops whose event is inside the snapshot settle with it, not twice', () => {
    const { core } = setup();
    core.issue({ kind: 'like', key: 'in', task_id: 'b', delta: 1 });
    core.issue({ kind: 'like', key: 'after', task_id: 'b', delta: 1 });
    core.accepted('in', { command_id: 'c-in' });
    core.accepted('after', { command_id: 'c-after' });
    core.loadSnapshot({ tasks: [task('b', { likes: 4, version: 5 })], watermark: 40 }, {
      outcomes: [
        { key: 'in', status: 'settled', event_id: 39 },
        { key: 'after', status: 'settled', event_id: 41 }, // still to come on the stream
      ],
    });
    assert.equal(item(core, 'b').task.likes, 5, 'base 4 (includes "in") + pending "after"');
    assert.deepEqual(item(core, 'b').ops.map((op) => op.key), ['after']);
  });

  test('events at or below the watermark are ignored', () => {
    const { core } = setup();
    const op = core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'x' } });
    const result = core.applyEvent(settled(op, task('a', { title: 'x', version: 2 }), { id: 10 }));
    assert.equal(result.applied, false);
    assert.equal(item(core, 'a').pending, true);
    assert.equal(core.applyEvent(settled(op, task('a', { title: 'x', version: 2 }), { id: 50 })).applied, true);
    assert.equal(core.applyEvent(settled(op, task('a', { title: 'x', version: 2 }), { id: 50 })).applied, false);
  });

  test('an older snapshot is refused unless forced', () => {
    const { core } = setup();
    assert.equal(core.loadSnapshot({ tasks: [], watermark: 5 }), false);
    assert.deepEqual(ids(core), ['a', 'b', 'c']);
    assert.equal(core.loadSnapshot({ tasks: [], watermark: 5 }, { force: true }), true);
    assert.deepEqual(ids(core), []);
  });

  test('pending ops survive a reload through persistedOps / restore', () => {
    const { core } = setup();
    core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'mine' }, base_version: 1 });
    core.accepted('u', { command_id: 'cmd-u' });
    core.issue({ kind: 'create', key: 'c', task_id: 'n', title: 'unsent' });
    const saved = JSON.parse(JSON.stringify(core.persistedOps()));

    const reloaded = createCore({ now: () => 2_000_000 });
    reloaded.restore(saved);
    reloaded.loadSnapshot({ tasks: [task('a')], watermark: 12 }, { force: true });
    assert.equal(item(reloaded, 'a').task.title, 'mine');
    assert.deepEqual(reloaded.pendingOps().map((op) => [op.key, op.state, op.command_id]), [
      ['u', 'pending', 'cmd-u'],
      ['c', 'sending', null],
    ]);
    assert.deepEqual(commandRequest(reloaded.getOp('u')), commandRequest(core.getOp('u')), 'same request under the same key');
  });

  test('an op that left its stack is never put back: a reload\'s own op, listed again among what it left', () => {
    const { core } = setup();
    const like = core.issue({ kind: 'like', key: 'l', task_id: 'b', delta: 1 });
    core.accepted('l', { command_id: 'cmd-l' });
    const saved = JSON.parse(JSON.stringify(core.persistedOps()));
    core.applyEvent(settled(like, task('b', { likes: 4, version: 5 })));
    assert.deepEqual(core.takeDeparted().map(({ op, outcome }) => [op.key, outcome]), [['l', 'settled']]);
    core.restore(saved);
    core.restore(saved, new Map([['l', { type: EVENT_SETTLED }]]));
    assert.deepEqual(core.pendingOps(), []);
    assert.deepEqual(core.takeDeparted(), [], 'it does not leave, and count, a second time');
    assert.equal(item(core, 'b').task.likes, 4);
  });
});

describe('timeouts and the sync indicator', () => {
  test('an op without its event turns checking after stuckMs, then stuck when still pending', () => {
    const { core, time } = setup();
    core.issue({ kind: 'like', key: 'l', task_id: 'a', delta: 1 });
    core.accepted('l', { command_id: 'cmd-l' });
    time.advance(4999);
    assert.deepEqual(core.tick(), []);
    time.advance(1);
    const due = core.tick();
    assert.deepEqual(due.map((op) => op.key), ['l']);
    assert.equal(core.getOp('l').state, 'checking');
    assert.deepEqual(core.tick(), [], 'checked once, not on every tick');
    core.statusChecked('l', { status: 'pending' });
    assert.equal(item(core, 'a').ops[0].state, 'stuck');
  });

  test('an op that never got its 202 goes straight to stuck; Retry restarts its clock', () => {
    const { core, time } = setup();
    core.issue({ kind: 'create', key: 'c', task_id: 'n', title: 'lost' });
    time.advance(6000);
    assert.deepEqual(core.tick(), []);
    assert.equal(core.getOp('c').state, 'stuck');
    core.resending('c');
    assert.equal(core.getOp('c').state, 'sending');
    time.advance(1000);
    core.tick();
    assert.equal(core.getOp('c').state, 'sending');
  });

  test('the status endpoint settles or fails an overdue op', () => {
    const { core, time } = setup();
    core.issue({ kind: 'update', key: 's', task_id: 'a', patch: { title: 'done already' } });
    core.issue({ kind: 'update', key: 'f', task_id: 'c', patch: { title: 'refused' } });
    core.accepted('s', { command_id: 'cs' });
    core.accepted('f', { command_id: 'cf' });
    time.advance(5000);
    core.tick();
    core.statusChecked('s', { status: 'settled', event_id: 99 }, task('a', { title: 'done already', version: 2 }));
    core.statusChecked('f', { status: 'failed', error: { reason: 'injected', message: 'boom' } }, task('c'));
    assert.equal(item(core, 'a').task.title, 'done already');
    assert.equal(item(core, 'a').pending, false);
    assert.equal(item(core, 'c').task.title, 'task c');
    assert.equal(core.getSnapshot().notices.length, 1);
  });

  test('a stuck delete keeps its row, marked deleting, so Retry and Discard are reachable', () => {
    const { core, time } = setup();
    core.issue({ kind: 'delete', key: 'd', task_id: 'b' });
    time.advance(5000);
    core.tick(); // never accepted: straight to stuck
    assert.deepEqual(ids(core), ['a', 'b', 'c']);
    assert.equal(item(core, 'b').deleting, true);
    assert.equal(item(core, 'b').ops[0].state, 'stuck');
    core.resending('d');
    assert.deepEqual([item(core, 'b').deleting, item(core, 'b').ops[0].state], [true, 'sending']);
    core.discard('d');
    assert.deepEqual([item(core, 'b').deleting, item(core, 'b').pending], [false, false]);
  });

  test('an op no attempt could send is stuck at once, saying why, until it is sent again', () => {
    const { core } = setup();
    core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'offline' } });
    core.unreached('u', { offline: true, detail: 'network error: Failed to fetch' });
    const [op] = item(core, 'a').ops;
    assert.deepEqual([op.state, { ...op.unreached }, op.accepted], ['stuck', { offline: true, detail: 'network error: Failed to fetch' }, false]);
    assert.equal(item(core, 'a').task.title, 'offline', 'still shown: it may yet apply');
    core.resending('u');
    assert.deepEqual([item(core, 'a').ops[0].state, item(core, 'a').ops[0].unreached], ['sending', undefined]);
    // One the server took is not marked so by a late report of a failed attempt.
    core.accepted('u', { command_id: 'cu' });
    core.unreached('u', { offline: true, detail: 'late' });
    assert.deepEqual([item(core, 'a').ops[0].state, item(core, 'a').ops[0].unreached], ['pending', undefined]);
  });

  test('an op marked unreached that another attempt got accepted is pending, and says so when overdue', () => {
    const { core, time } = setup();
    core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'twice sent' } });
    core.unreached('u', { offline: true, detail: 'network error' });
    core.accepted('u', { command_id: 'cu' });
    assert.deepEqual([item(core, 'a').ops[0].state, item(core, 'a').ops[0].unreached], ['pending', undefined]);
    time.advance(5000);
    assert.deepEqual(core.tick().map((op) => op.key), ['u'], 'asked about like any op the server holds');
    core.statusChecked('u', { status: 'pending' }, undefined);
    assert.deepEqual([item(core, 'a').ops[0].state, item(core, 'a').ops[0].unreached], ['stuck', undefined]);
    assert.equal(item(core, 'a').ops[0].accepted, true, 'the view tells "still processing" from "still being sent"');
  });

  test('a burst of failures leaves a notice for each until dismissed, one or all', () => {
    const { core } = setup();
    const ops = Array.from({ length: 10 }, (_, n) => core.issue({ kind: 'create', key: `c${n}`, task_id: `n${n}`, title: `new ${n}` }));
    for (const op of ops) core.applyEvent(failed(op, 'injected', null));
    const texts = core.getSnapshot().notices.map((notice) => notice.text);
    assert.deepEqual(texts, ops.map((op) => `Create “${op.title}” failed: the server rejected it (injected failure).`));
    core.dismissNotice(core.getSnapshot().notices[0].id);
    assert.equal(core.getSnapshot().notices.length, 9);
    core.dismissNotice();
    assert.deepEqual(core.getSnapshot().notices, []);
  });

  test('discard drops the op and says so', () => {
    const { core } = setup();
    core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'never mind' } });
    core.discard('u');
    assert.equal(item(core, 'a').task.title, 'task a');
    assert.equal(core.getSnapshot().notices[0].level, 'info');
    assert.equal(core.getSnapshot().notices[0].text, 'Rename “task a” to “never mind”: stopped waiting. If the server applies it later, it will show up.');
    core.issue({ kind: 'delete', key: 'd', task_id: 'b' });
    core.discard('d');
    assert.equal(core.getSnapshot().notices[1].text, 'Delete “task b”: stopped waiting. If the server applies it later, the task will go then.');
  });

  test('a discarded create that never applied takes the changes stacked on it along', () => {
    const { core } = setup();
    core.issue({ kind: 'create', key: 'c', task_id: 'n', title: 'lost' });
    core.issue({ kind: 'like', key: 'l', task_id: 'n', delta: 1 });
    core.issue({ kind: 'update', key: 'u', task_id: 'n', patch: { title: 'lost, renamed' } });
    for (const key of ['c', 'l', 'u']) core.accepted(key, { command_id: `cmd-${key}` });
    core.takeDeparted();
    core.discard('c');
    assert.deepEqual(ids(core), ['a', 'b', 'c'], 'no row, and no op left without one');
    assert.deepEqual(core.pendingOps(), []);
    assert.deepEqual(core.takeDeparted().map(({ op, outcome }) => [op.key, outcome]), [['c', 'discarded'], ['l', 'discarded'], ['u', 'discarded']]);
    assert.equal(core.getSnapshot().notices.at(-1).text,
      'Create “lost” and 2 changes made to it: stopped waiting. If the server applies them later, they will show up.');
    // The server applies them after all: each is told.
    core.applyEvent(settled({ kind: 'create', key: 'c', task_id: 'n' }, task('n', { title: 'lost' })));
    core.applyEvent(settled({ kind: 'like', key: 'l', task_id: 'n' }, task('n', { title: 'lost', likes: 1, version: 2 })));
    assert.deepEqual(core.takeDeparted().map(({ op, outcome }) => [op.key, outcome]), [['c', 'applied_late'], ['l', 'applied_late']]);
    assert.equal(item(core, 'n').task.likes, 1);
  });

  test('a discarded create of a task that applied leaves the changes on it', () => {
    const { core } = setup();
    core.issue({ kind: 'like', key: 'l', task_id: 'a', delta: 1 });
    core.issue({ kind: 'create', key: 'c', task_id: 'a', title: 'again' }); // a replayed create of a known task
    core.discard('c');
    assert.deepEqual(core.pendingOps().map((op) => op.key), ['l']);
  });

  test('a discarded op that the server applies after all says so, by its key', () => {
    const { core } = setup();
    const like = core.issue({ kind: 'like', key: 'l', task_id: 'b', delta: 1 });
    core.accepted('l', { command_id: 'cmd-l' });
    core.discard('l');
    // Not "it will show up": the page keeps this browser's likes where the clicks left them.
    assert.equal(core.getSnapshot().notices.at(-1).text,
      'Like “task b”: stopped waiting. If the server applies it later, the page sets the like back to where your clicks left it.');
    core.applyEvent(settled(core.getOp('l') ?? { ...like, command_id: 'cmd-l' }, task('b', { likes: 4, version: 5 })));
    const notice = core.getSnapshot().notices.at(-1);
    assert.deepEqual(
      [notice.reason, notice.op_kind, notice.delta, notice.text],
      ['applied_late', 'like', 1, 'Like “task b”, which you stopped waiting for, was applied after all: the page sets the like back to where your clicks left it.'],
    );
    assert.equal(item(core, 'b').task.likes, 4);
    core.applyEvent(settled({ ...like, command_id: 'cmd-l' }, task('b', { likes: 4, version: 5 })));
    assert.equal(core.getSnapshot().notices.filter((n) => n.reason === 'applied_late').length, 1, 'told once');
  });

  test('an op discarded before its 202 came is remembered too: its request may have reached the server', () => {
    const { core } = setup();
    const like = core.issue({ kind: 'like', key: 'l', task_id: 'b', delta: 1 });
    core.discard('l');
    core.accepted('l', { command_id: 'cmd-l' });
    assert.equal(core.persistedDiscarded()[0].command_id, 'cmd-l', 'the late 202 gives it an id to ask about');
    core.takeDeparted();
    core.applyEvent(settled({ ...like, command_id: 'cmd-l' }, task('b', { likes: 4, version: 5 })));
    assert.deepEqual(core.takeDeparted().map(({ op, outcome }) => [op.key, outcome]), [['l', 'applied_late']]);
  });

  test('a discarded op applied inside a snapshot (its event will not come) is told by its status', () => {
    const { core } = setup();
    for (const key of ['early', 'late', 'failed']) {
      core.issue({ kind: 'like', key, task_id: 'b', delta: 1 });
      core.accepted(key, { command_id: `cmd-${key}` });
      core.discard(key);
    }
    core.takeDeparted();
    core.loadSnapshot({ tasks: [task('b', { likes: 4, version: 5 })], watermark: 40 }, {
      force: true,
      outcomes: [
        { key: 'early', status: 'settled', event_id: 39 },
        { key: 'late', status: 'settled', event_id: 41 }, // after the snapshot: the stream brings it
        { key: 'failed', status: 'failed', event_id: 38, error: { reason: 'injected' } },
      ],
    });
    assert.deepEqual(core.takeDeparted().map(({ op, outcome }) => [op.key, outcome]), [['early', 'applied_late']]);
    assert.deepEqual(core.persistedDiscarded().map((op) => op.key), ['late']);
    assert.equal(core.getSnapshot().notices.filter((n) => n.reason === 'applied_late').length, 1);
  });

  test('a discarded op is remembered across a reload, to tell its late apply', () => {
    const { core } = setup();
    core.issue({ kind: 'like', key: 'l', task_id: 'b', delta: 1 });
    core.accepted('l', { command_id: 'cmd-l' });
    core.discard('l');
    const reloaded = createCore({ now: () => 2_000_000 });
    reloaded.loadSnapshot({ tasks: [task('b', { likes: 3, version: 4 })], watermark: 10 });
    reloaded.restoreDiscarded(JSON.parse(JSON.stringify(core.persistedDiscarded())));
    reloaded.applyEvent({ id: 11, type: EVENT_SETTLED, data: { command_id: 'cmd-l', idempotency_key: 'l', task_id: 'b', kind: 'like', task: task('b', { likes: 4, version: 5 }) } });
    assert.equal(reloaded.getSnapshot().notices.at(-1).reason, 'applied_late');
    assert.deepEqual(reloaded.takeDeparted().map(({ op, outcome }) => [op.key, outcome]), [['l', 'applied_late']]);
  });

  test('takeDeparted tells how each op left, however many left in one step', () => {
    const { core } = setup();
    const ok = core.issue({ kind: 'like', key: 'ok', task_id: 'a', delta: 1 });
    const bad = core.issue({ kind: 'like', key: 'bad', task_id: 'b', delta: 1 });
    const refused = core.issue({ kind: 'like', key: 'refused', task_id: 'c', delta: -1 });
    const late = core.issue({ kind: 'like', key: 'late', task_id: 'c', delta: 1 });
    core.accepted('late', { command_id: 'cmd-late' });
    core.applyEvent(settled(ok, task('a', { likes: 1, version: 2 })));
    core.applyEvent(failed(bad, 'not_found', null));
    core.rejected('refused', { status: 422, detail: 'no' });
    core.discard('late');
    core.applyEvent(settled({ ...late, command_id: 'cmd-late' }, task('c', { likes: 1, version: 2 })));
    const inSnapshot = [1, 2, 3].map((n) => core.issue({ kind: 'like', key: `s${n}`, task_id: 'a', delta: 1 }));
    core.loadSnapshot({ tasks: [task('a', { likes: 4, version: 5 })], watermark: 200 }, {
      outcomes: inSnapshot.map((op) => ({ key: op.key, status: 'settled', event_id: 150 })),
    });
    assert.deepEqual(core.takeDeparted().map(({ op, outcome, reason }) => [op.key, outcome, reason]), [
      ['ok', 'settled', undefined],
      ['bad', 'failed', 'not_found'],
      ['refused', 'rejected', undefined],
      ['late', 'discarded', undefined],
      ['late', 'applied_late', undefined],
      ['s1', 'settled', undefined],
      ['s2', 'settled', undefined],
      ['s3', 'settled', undefined],
    ]);
    assert.deepEqual(core.takeDeparted(), []);
  });

  test('a clock set back starts the timeout over instead of waiting for the clock to come back', () => {
    const { core, time } = setup();
    core.issue({ kind: 'like', key: 'l', task_id: 'a', delta: 1 });
    core.accepted('l', { command_id: 'cmd-l' });
    time.advance(-500); // a small step back (NTP's): nothing to show yet
    core.tick();
    assert.equal(core.getSnapshot().sync.count, 0);
    time.advance(-3_600_000); // the system clock is set back an hour
    core.tick();
    assert.equal(core.getOp('l').state, 'pending');
    // Its age is not known either: the sync indicator counts it rather than leave it out
    // until the clock comes back.
    assert.equal(core.getSnapshot().sync.count, 1);
    time.advance(5000);
    assert.deepEqual(core.tick().map((op) => op.key), ['l']);
    assert.equal(core.getOp('l').state, 'checking');
  });

  test('the sync figures count ops older than syncMs and clear on settle', () => {
    const { core, time } = setup();
    const op = core.issue({ kind: 'like', key: 'l', task_id: 'a', delta: 1 });
    const issuedAt = time.now();
    time.advance(799);
    core.tick();
    assert.equal(core.getSnapshot().sync.count, 0);
    time.advance(1);
    core.tick();
    assert.deepEqual({ ...core.getSnapshot().sync }, { count: 1, oldest_issued_at: issuedAt });
    core.applyEvent(settled(op, task('a', { likes: 1, version: 2 })));
    assert.equal(core.getSnapshot().sync.count, 0);
    const [sample] = core.getSnapshot().window_samples;
    assert.equal(sample.ms, 800, 'client-measured window: issue to settled event');
  });
});

describe('conflicts', () => {
  test('a conflicting edit opens yours / theirs; keep mine re-submits on the current version', () => {
    const { core } = setup();
    const op = core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'mine' }, base_version: 1 });
    const theirs = task('a', { title: 'theirs', version: 2 });
    core.applyEvent(failed(op, 'conflict', theirs));
    const { conflict, task: shown } = item(core, 'a');
    assert.equal(shown.title, 'theirs', 'the item shows ground truth, nothing overwritten');
    assert.deepEqual({ ...conflict.yours }, { title: 'mine' });
    assert.equal(conflict.theirs.title, 'theirs');
    const intent = core.resolveConflict('a', 'mine');
    assert.deepEqual(
      { ...intent, seen: undefined },
      { kind: 'update', task_id: 'a', base_version: 2, patch: { title: 'mine' }, seen: undefined },
    );
    assert.deepEqual(intent.seen.title, ['theirs'], 'Keep mine is made on what the user chose over');
    assert.equal(item(core, 'a').conflict, null);
  });

  test('an open conflict shows theirs as it is now: Keep mine replaces what the view shows', () => {
    const { core } = setup();
    const op = core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'mine' }, ...core.editBase('a') });
    core.applyEvent(failed(op, 'conflict', task('a', { title: 'theirs 1', version: 2 })));
    core.applyEvent(settled({ key: 'x', task_id: 'a', kind: 'update' }, task('a', { title: 'theirs 2', notes: 'n', version: 3 })));
    const { conflict } = item(core, 'a');
    assert.deepEqual([conflict.theirs.title, [...conflict.changed]], ['theirs 2', ['title', 'notes']]);
    assert.equal(core.resolveConflict('a', 'mine').base_version, 3);
  });

  test('a snapshot without the task closes its conflict, which is then not kept across a reload', () => {
    const { core } = setup();
    const op = core.issue({ kind: 'update', key: 'u', task_id: 'c', patch: { title: 'mine' }, base_version: 1 });
    core.applyEvent(failed(op, 'conflict', task('c', { title: 'theirs', version: 2 }), { id: 40 }));
    assert.deepEqual(core.persistedConflicts().map((conflict) => conflict.task_id), ['c']);
    core.loadSnapshot({ tasks: [task('a')], watermark: 50 });
    assert.deepEqual(core.persistedConflicts(), []);
    assert.equal(core.resolveConflict('c', 'mine'), null);
  });

  test('take theirs closes the conflict and sends nothing', () => {
    const { core } = setup();
    const op = core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'mine' }, base_version: 1 });
    core.applyEvent(failed(op, 'conflict', task('a', { title: 'theirs', version: 2 })));
    assert.equal(core.resolveConflict('a', 'theirs'), null);
    assert.equal(item(core, 'a').conflict, null);
    assert.equal(item(core, 'a').task.title, 'theirs');
  });

  test('an edit waits behind our own pending ops on the task, and goes out on the version they led to', () => {
    const { core } = setup();
    const like = core.issue({ kind: 'like', key: 'l', task_id: 'b', delta: 1 });
    const rename = core.issue({ kind: 'update', key: 'u', task_id: 'b', patch: { title: 't' }, ...core.editBase('b') });
    assert.equal(rename.state, 'queued');
    assert.equal(item(core, 'b').task.title, 't', 'predicted at once all the same');
    assert.deepEqual(core.takeOutbox().map((op) => op.key), ['l'], 'the like goes out; the rename waits for it');
    core.applyEvent(settled(like, task('b', { likes: 4, version: 5 })));
    const [sent] = core.takeOutbox();
    assert.equal(sent.key, 'u', 'its own key: it was never sent');
    assert.deepEqual(commandRequest(sent).body, { title: 't', base_version: 5 });
  });

  test('an edit queued past the timeout is offered Retry and Discard; Retry sends it on the version by our own doing, once', () => {
    const { core, time } = setup();
    const like = core.issue({ kind: 'like', key: 'l', task_id: 'b', delta: 1 });
    core.accepted('l', { command_id: 'cmd-l' });
    core.issue({ kind: 'update', key: 'u', task_id: 'b', patch: { title: 't' }, ...core.editBase('b') });
    core.takeOutbox();
    time.advance(4999);
    core.tick();
    assert.equal(item(core, 'b').ops.find((op) => op.key === 'u').overdue, false);
    time.advance(1);
    core.tick();
    const shownOp = item(core, 'b').ops.find((op) => op.key === 'u');
    assert.deepEqual([shownOp.state, shownOp.overdue], ['queued', true], 'still waiting, and said to');
    assert.equal(core.resending('u'), undefined);
    assert.equal(core.getOp('u').state, 'queued', 'a plain re-send does not send it without its version');

    assert.deepEqual(core.sendNow('u'), []);
    const [sent] = core.takeOutbox();
    assert.deepEqual([sent.key, commandRequest(sent).body], ['u', { title: 't', base_version: 4 }], 'the like ahead is not counted');
    assert.equal(core.getOp('u').overdue, undefined);
    core.applyEvent(settled(like, task('b', { likes: 4, version: 5 })));
    assert.deepEqual(core.takeOutbox(), [], 'not sent a second time when its turn would have come');
  });

  test('Retry of the later of two queued edits sends both, in their order; behind an op the server has not taken, neither', () => {
    const { core } = overdueBehind({ kind: 'like', key: 'l', task_id: 'b', delta: 1 },
      ['a', 'b', { title: 'A' }], ['b2', 'b', { title: 'B' }]);
    // The like has no 202: sent after it, the edits would apply first.
    assert.deepEqual(core.sendNow('b2').map((op) => op.key), ['l']);
    assert.deepEqual(core.takeOutbox(), []);

    core.accepted('l', { command_id: 'cmd-l' });
    assert.deepEqual(core.sendNow('b2'), []);
    assert.deepEqual(core.takeOutbox().map((op) => [op.key, commandRequest(op).body]),
      [['a', { title: 'A', base_version: 4 }], ['b2', { title: 'B', base_version: 4 }]],
      'the earlier first: the later one never ends under it');
  });

  test('an overdue edit behind a create not applied yet waits for it: Retry sends the create again', () => {
    const { core } = overdueBehind({ kind: 'create', key: 'c', task_id: 'n', title: 'new' }, ['u', 'n', { title: 'newer' }]);
    assert.deepEqual(core.sendNow('u').map((op) => op.key), ['c']);
    assert.deepEqual(core.takeOutbox(), []);
    assert.equal(core.getOp('u').state, 'queued');
  });

  test('an edit queued on a create goes out once the create settles, on version 1; discarded with the create, never', () => {
    const { core } = setup();
    const create = core.issue({ kind: 'create', key: 'c', task_id: 'n', title: 'new' });
    core.issue({ kind: 'update', key: 'u', task_id: 'n', patch: { title: 'newer' }, ...core.editBase('n') });
    core.applyEvent(settled(create, task('n', { title: 'new', version: 1 })));
    assert.deepEqual(core.takeOutbox().map((op) => commandRequest(op).body), [{ title: 'newer', base_version: 1 }]);

    core.issue({ kind: 'create', key: 'c2', task_id: 'm', title: 'other' });
    core.issue({ kind: 'update', key: 'u2', task_id: 'm', patch: { title: 'others' }, ...core.editBase('m') });
    core.discard('c2');
    assert.deepEqual(core.takeOutbox(), [], 'the edit went with the create it waited for');
    assert.equal(core.pendingOps().length, 1);
  });

  test("our op ahead fails while someone else's change applies: the edit behind it is not sent on a count that comes out right by chance", () => {
    // b is at version 4. Our like and our done toggle are pending, a rename waits behind
    // them. Someone else's rename applies (5), our like applies (6), our toggle fails: the
    // task is at 6, as it would be had both of ours applied.
    const { core } = setup();
    const like = core.issue({ kind: 'like', key: 'l', task_id: 'b', delta: 1 });
    const done = core.issue({ kind: 'update', key: 'd', task_id: 'b', patch: { done: true } });
    core.issue({ kind: 'update', key: 'u', task_id: 'b', patch: { title: 'mine' }, ...core.editBase('b') });
    core.applyEvent(settled({ key: 'theirs', task_id: 'b', kind: 'update' }, task('b', { title: 'theirs', likes: 3, version: 5 })));
    core.applyEvent(settled(like, task('b', { title: 'theirs', likes: 4, version: 6 })));
    core.applyEvent(failed(done, 'injected', task('b', { title: 'theirs', likes: 4, version: 6 })));
    const [sent] = core.takeOutbox();
    assert.deepEqual(commandRequest(sent).body, { title: 'mine', base_version: 5 }, 'made on 4, and one change of ours since');
    core.applyEvent(failed(sent, 'conflict', task('b', { title: 'theirs', likes: 4, version: 6 })));
    const { conflict } = item(core, 'b');
    assert.deepEqual([{ ...conflict.yours }, conflict.theirs.title, conflict.kept_moving], [{ title: 'mine' }, 'theirs', false]);
    assert.deepEqual(core.takeOutbox(), [], 'the user decides');
  });
});

describe('conflicts nobody else caused are re-sent, not put to the user', () => {
  /** A core whose only outbox is read by the test; keys of rebased edits are r1, r2, ... */
  function rebaseSetup() {
    let keys = 0;
    return setup({ newKey: () => `r${(keys += 1)}` });
  }
  const errors = (core) => core.getSnapshot().notices.filter((notice) => notice.level === 'error');

  test('our own like ahead of a rename fails: the rename goes out on the version the task has, and nothing conflicts', () => {
    const { core } = rebaseSetup();
    const like = core.issue({ kind: 'like', key: 'l', task_id: 'b', delta: 1 });
    core.issue({ kind: 'update', key: 'u', task_id: 'b', patch: { title: 'mine' }, ...core.editBase('b') });
    core.applyEvent(failed(like, 'injected', task('b', { likes: 3, version: 4 })));

    const { task: shown, conflict, ops } = item(core, 'b');
    assert.equal(conflict, null);
    assert.equal(shown.title, 'mine', 'the rename is still predicted');
    assert.deepEqual(ops.map((op) => [op.key, op.kind, op.state]), [['u', 'update', 'sending']]);
    assert.equal(errors(core).length, 1, "only the like's failure is told");
    const [sent] = core.takeOutbox();
    assert.deepEqual(commandRequest(sent).body, { title: 'mine', base_version: 4 });
    assert.deepEqual(core.takeOutbox(), [], 'taken once');
  });

  test('an edit refused because the version moved for another reason is re-sent as a new command, the same intent', () => {
    const { core } = rebaseSetup();
    const rename = core.issue({ kind: 'update', key: 'u', task_id: 'b', patch: { title: 'mine' }, ...core.editBase('b') });
    core.applyEvent(failed(rename, 'conflict', task('b', { likes: 4, version: 5 })));
    const [resent] = core.takeOutbox();
    assert.equal(resent.key, 'r1', 'a new command: the refused one keeps its key and its answer');
    assert.equal(resent.issued_at, rename.issued_at, 'still the same intent: its age runs on');
    assert.deepEqual(commandRequest(resent).body, { title: 'mine', base_version: 5 });
    assert.deepEqual(core.takeOutbox(), [], 'taken once');
  });

  test("someone else's like or change to another field is no reason to ask: the edit is re-sent", () => {
    const { core } = rebaseSetup();
    const rename = core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'mine' }, ...core.editBase('a') });
    core.applyEvent(failed(rename, 'conflict', task('a', { likes: 1, notes: 'their notes', version: 3 })));
    assert.equal(item(core, 'a').conflict, null);
    const [resent] = core.takeOutbox();
    assert.deepEqual(commandRequest(resent).body, { title: 'mine', base_version: 3 });
    assert.deepEqual(item(core, 'a').task, { ...task('a', { likes: 1, notes: 'their notes', version: 3 }), title: 'mine' });
  });

  test("an edit whose field someone else changed is put to the user, whatever else moved", () => {
    const { core } = rebaseSetup();
    const edit = core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'mine', notes: 'n' }, ...core.editBase('a') });
    core.applyEvent(failed(edit, 'conflict', task('a', { notes: 'their notes', likes: 2, version: 4 })));
    assert.deepEqual({ ...item(core, 'a').conflict.yours }, { title: 'mine', notes: 'n' });
    assert.equal(item(core, 'a').conflict.kept_moving, false);
    assert.deepEqual(core.takeOutbox(), []);
    assert.equal(errors(core).length, 1);
  });

  test('an editor keeps the values it opened on: a rename that lands while it is open conflicts', () => {
    const { core } = rebaseSetup();
    const opened = core.editBase('a');
    core.applyEvent(settled({ key: 'theirs', task_id: 'a', kind: 'update' }, task('a', { title: 'theirs', version: 2 })));
    const edit = core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'mine' }, ...opened });
    assert.equal(edit.base_version, 1);
    core.applyEvent(failed(edit, 'conflict', task('a', { title: 'theirs', version: 2 })));
    assert.equal(item(core, 'a').conflict.theirs.title, 'theirs');
    assert.deepEqual(core.takeOutbox(), []);
  });

  test('two renames queued behind our like go out in turn; refused after a like of someone else, the earlier leaves its title to the later', () => {
    const { core } = rebaseSetup();
    const like = core.issue({ kind: 'like', key: 'l', task_id: 'a', delta: 1 });
    const first = core.issue({ kind: 'update', key: 'u1', task_id: 'a', patch: { title: 'B', notes: 'b' }, ...core.editBase('a') });
    const second = core.issue({ kind: 'update', key: 'u2', task_id: 'a', patch: { title: 'C' }, ...core.editBase('a') });
    assert.deepEqual([first.state, second.state], ['queued', 'queued']);
    assert.deepEqual([...second.seen.title], ['task a', 'B']);
    // Someone else's like takes version 2; ours fails.
    const liked = task('a', { likes: 1, version: 2 });
    core.applyEvent(failed(like, 'injected', liked));
    assert.deepEqual(core.takeOutbox().map((op) => [op.key, commandRequest(op).body]), [['u1', { title: 'B', notes: 'b', base_version: 1 }]]);
    core.applyEvent(failed(first, 'conflict', liked));
    assert.deepEqual(core.takeOutbox().map((op) => [op.key, commandRequest(op).body]), [['u2', { title: 'C', base_version: 1 }]],
      'the later rename\'s turn; the earlier one, re-sent without its title, waits behind it');
    core.applyEvent(failed(second, 'conflict', liked));
    assert.deepEqual(core.takeOutbox().map((op) => [op.key, commandRequest(op).body]), [['r1', { notes: 'b', base_version: 2 }]]);
    assert.deepEqual(item(core, 'a').ops.map((op) => [op.key, op.state]), [['r1', 'sending'], ['r2', 'queued']]);
    assert.equal(item(core, 'a').task.title, 'C');
    assert.equal(item(core, 'a').conflict, null);
  });

  test('an edit superseded whole by a later one of ours is dropped without a word', () => {
    const { core } = rebaseSetup();
    const first = core.issue({ kind: 'update', key: 'u1', task_id: 'a', patch: { title: 'B' }, ...core.editBase('a') });
    core.issue({ kind: 'update', key: 'u2', task_id: 'a', patch: { title: 'C' }, ...core.editBase('a') });
    core.takeOutbox();
    core.applyEvent(failed(first, 'conflict', task('a', { likes: 1, version: 2 })));
    assert.deepEqual(core.takeOutbox().map((op) => op.key), ['u2'], 'its turn: nothing of the first is re-sent');
    assert.deepEqual(item(core, 'a').ops.map((op) => op.key), ['u2']);
    assert.equal(errors(core).length, 0);
  });

  test('after five re-sends on versions that keep moving, the user decides, told why', () => {
    const { core } = rebaseSetup();
    let op = core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'mine' }, ...core.editBase('a') });
    for (let version = 2; version <= 6; version += 1) {
      core.applyEvent(failed(op, 'conflict', task('a', { likes: version, version })));
      [op] = core.takeOutbox();
      assert.equal(op.base_version, version);
    }
    core.applyEvent(failed(op, 'conflict', task('a', { likes: 7, version: 7 })));
    assert.deepEqual(core.takeOutbox(), []);
    const { conflict, task: shown } = item(core, 'a');
    assert.deepEqual([{ ...conflict.yours }, conflict.kept_moving], [{ title: 'mine' }, true]);
    assert.equal(shown.title, 'task a', 'ground truth, nothing overwritten');
    const [notice] = errors(core);
    assert.match(notice.text, /was not applied: the task kept changing while it was sent .*6 times/);
    assert.doesNotMatch(notice.text, /someone else/, 'nobody changed the title: no one is blamed');
    const again = core.resolveConflict('a', 'mine');
    assert.deepEqual([again.base_version, again.patch], [7, { title: 'mine' }]);
  });

  test("a delete is re-sent past someone else's like, and put to the user after their rename", () => {
    const { core } = rebaseSetup();
    const liked = core.issue({ kind: 'delete', key: 'd1', task_id: 'a', ...core.editBase('a') });
    core.applyEvent(failed(liked, 'conflict', task('a', { likes: 1, version: 2 })));
    const [resent] = core.takeOutbox();
    assert.deepEqual(commandRequest(resent), { method: 'DELETE', path: '/api/tasks/a', body: { base_version: 2 } });
    assert.equal(item(core, 'a').deleting, true, 'still being deleted');

    const renamed = core.issue({ kind: 'delete', key: 'd2', task_id: 'c', ...core.editBase('c') });
    core.applyEvent(failed(renamed, 'conflict', task('c', { title: 'theirs', version: 2 })));
    const { conflict, task: shown } = item(core, 'c');
    assert.deepEqual([conflict.kind, { ...conflict.yours }, [...conflict.changed]], ['delete', { deleted: true }, ['title']]);
    assert.equal(shown.title, 'theirs', 'back, as the server has it');
    assert.deepEqual(core.takeOutbox(), []);
  });

  test('an edit queued behind our ops stays queued across a reload, on what it was made on', () => {
    const { core } = rebaseSetup();
    core.issue({ kind: 'like', key: 'l', task_id: 'a', delta: 1 });
    core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'mine' }, ...core.editBase('a') });
    const reloaded = createCore({ now: () => 2_000_000, newKey: () => 'after-reload' });
    reloaded.loadSnapshot({ tasks: [task('a')], watermark: 10 });
    reloaded.restore(JSON.parse(JSON.stringify(core.persistedOps())));
    assert.equal(reloaded.getOp('u').state, 'queued');
    assert.deepEqual(reloaded.takeOutbox(), []);
    reloaded.applyEvent(failed(reloaded.getOp('l'), 'injected', task('a')));
    const [sent] = reloaded.takeOutbox();
    assert.equal(sent.key, 'u');
    assert.deepEqual(commandRequest(sent).body, { title: 'mine', base_version: 1 });
  });

  test('restored without the ops it waited for (done while the page was away), a queued edit goes out at once', () => {
    const { core } = rebaseSetup();
    core.issue({ kind: 'like', key: 'l', task_id: 'a', delta: 1 });
    core.issue({ kind: 'update', key: 'u', task_id: 'a', patch: { title: 'mine' }, ...core.editBase('a') });
    const reloaded = createCore({ now: () => 2_000_000 });
    reloaded.restore(JSON.parse(JSON.stringify(core.persistedOps())).filter((op) => op.key === 'u'));
    assert.deepEqual(reloaded.takeOutbox().map((op) => [op.key, op.base_version]), [['u', 1]]);
  });
});

describe('snapshot identity', () => {
  test('getSnapshot returns the same object until something changes', () => {
    const { core, time } = setup();
    const first = core.getSnapshot();
    assert.equal(core.getSnapshot(), first);
    core.tick();
    assert.equal(core.getSnapshot(), first, 'a tick that changes nothing keeps identity');
    time.advance(10);
    core.issue({ kind: 'like', key: 'l', task_id: 'b', delta: 1 });
    const second = core.getSnapshot();
    assert.notEqual(second, first);
    assert.equal(second.items[0], first.items[0], 'untouched items keep their identity');
    assert.notEqual(second.items[1], first.items[1]);
    assert.ok(Object.isFrozen(second) && Object.isFrozen(second.items) && Object.isFrozen(second.items[1].task));
  });

  test('subscribers hear every change and can unsubscribe', () => {
    const { core } = setup();
    let calls = 0;
    const unsubscribe = core.subscribe(() => { calls += 1; });
    core.issue({ kind: 'like', key: 'l', task_id: 'b', delta: 1 });
    unsubscribe();
    core.issue({ kind: 'like', key: 'm', task_id: 'b', delta: 1 });
    assert.equal(calls, 1);
  });
});

describe('command requests', () => {
  test('each kind maps to its endpoint and a stable body', () => {
    const { core } = setup();
    const make = (intent) => commandRequest(core.issue({ key: `${intent.kind}-${intent.task_id}`, ...intent }));
    assert.deepEqual(make({ kind: 'create', task_id: 'n', title: 'hi' }), { method: 'POST', path: '/api/tasks', body: { id: 'n', title: 'hi' } });
    assert.deepEqual(make({ kind: 'update', task_id: 'a', patch: { done: true } }), { method: 'PATCH', path: '/api/tasks/a', body: { done: true } });
    assert.deepEqual(make({ kind: 'delete', task_id: 'c' }), { method: 'DELETE', path: '/api/tasks/c', body: null });
    assert.deepEqual(make({ kind: 'like', task_id: 'b', delta: -1 }), { method: 'POST', path: '/api/tasks/b/likes', body: { delta: -1 } });
  });
});
