// Unit tests of the pure parts of the core: what a refused edit becomes (conflicts.js)
// and the per-task stacks of pending ops (stacks.js). The core's own tests
// (core.test.js) cover them again through its API.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';

import {
  conflictOf, createConflictBook, rebasePlan, refreshedConflict, revivedConflict, seenValues,
} from '../../static/conflicts.js';
import { createStacks, NO_OPS } from '../../static/stacks.js';

function task(fields = {}) {
  return { id: 'a', title: 'milk', notes: '', done: false, likes: 0, version: 3, ...fields };
}

function edit(patch, seenTask, fields = {}) {
  return { key: 'k1', task_id: 'a', kind: 'update', patch, seen: seenValues(seenTask, NO_OPS), ...fields };
}

describe('seenValues', () => {
  test('records the confirmed value and every value the pending ops predict', () => {
    const ops = [
      { kind: 'update', patch: { title: 'bread' } },
      { kind: 'update', patch: { done: true } },
    ];
    const seen = seenValues(task(), ops);
    assert.deepEqual(seen.title, ['milk', 'bread']);
    assert.deepEqual(seen.done, [false, true]);
    assert.deepEqual(seen.notes, ['']);
    assert.ok(Object.isFrozen(seen) && Object.isFrozen(seen.title));
  });

  test('a task still being created is seen as its create predicts it', () => {
    const seen = seenValues(undefined, [{ kind: 'create', task_id: 'a', title: 'new', notes: 'n' }]);
    assert.deepEqual(seen, { title: ['new'], notes: ['n'], done: [false] });
  });
});

describe('rebasePlan', () => {
  test('an edit whose fields nobody else changed is re-sent, whatever moved the version', () => {
    const op = edit({ title: 'bread' }, task());
    const plan = rebasePlan(op, task({ version: 5, likes: 2, done: true }), []);
    assert.deepEqual(plan, { fate: 'resent', fields: ['title'] });
  });

  test('someone else changing a field the edit sets puts it to the user', () => {
    const op = edit({ title: 'bread' }, task());
    assert.equal(rebasePlan(op, task({ version: 5, title: 'eggs' }), []), null);
  });

  test('fields a later edit of ours sets are left out of the re-send', () => {
    const op = edit({ title: 'bread', done: true }, task());
    const later = [{ kind: 'update', patch: { title: 'cheese' } }];
    assert.deepEqual(rebasePlan(op, task({ version: 5 }), later), { fate: 'resent', fields: ['done'] });
    const all = [{ kind: 'update', patch: { title: 'x', done: false } }];
    assert.deepEqual(rebasePlan(op, task({ version: 5 }), all), { fate: 'resent', fields: [] });
  });

  test('a delete is re-sent only when no field moved', () => {
    const op = { key: 'k', task_id: 'a', kind: 'delete', seen: seenValues(task(), NO_OPS) };
    assert.deepEqual(rebasePlan(op, task({ version: 4, likes: 9 }), []).fate, 'resent');
    assert.equal(rebasePlan(op, task({ version: 4, notes: 'changed' }), []), null);
  });

  test('after five re-sends the version is said to keep moving', () => {
    const op = edit({ title: 'bread' }, task(), { rebased: 5 });
    assert.deepEqual(rebasePlan(op, task({ version: 9 }), []), { fate: 'kept_moving' });
    assert.equal(rebasePlan(edit({ title: 'b' }, task(), { rebased: 4 }), task(), []).fate, 'resent');
  });

  test('nothing to go on (no seen values, no task, a like) means no plan', () => {
    assert.equal(rebasePlan({ kind: 'update', patch: { title: 'x' } }, task(), []), null);
    assert.equal(rebasePlan(edit({ title: 'x' }, task()), null, []), null);
    assert.equal(rebasePlan({ kind: 'like', delta: 1, seen: {} }, task(), []), null);
  });
});

describe('conflicts', () => {
  test('a conflict names the fields someone else changed that the user had not seen', () => {
    const op = edit({ title: 'bread' }, task());
    const theirs = task({ version: 5, title: 'eggs', notes: 'by someone' });
    const conflict = conflictOf(op, theirs, false);
    assert.deepEqual(conflict.yours, { title: 'bread' });
    assert.deepEqual(conflict.changed, ['title', 'notes']);
    assert.equal(conflict.kept_moving, false);
    assert.deepEqual(conflictOf({ ...op, kind: 'delete' }, theirs, false).yours, { deleted: true });
  });

  test('an open conflict follows the task to newer versions only, adding what moved', () => {
    const conflict = conflictOf(edit({ title: 'bread' }, task()), task({ version: 5, title: 'eggs' }), false);
    assert.equal(refreshedConflict(conflict, task({ version: 5, done: true })), conflict);
    assert.equal(refreshedConflict(conflict, undefined), conflict);
    const moved = refreshedConflict(conflict, task({ version: 6, title: 'eggs', done: true }));
    assert.equal(moved.theirs.version, 6);
    assert.deepEqual(moved.changed, ['title', 'done']);
  });

  test('a stored conflict comes back frozen, and what is not one is refused', () => {
    const revived = revivedConflict({ task_id: 'a', kind: 'update', yours: { title: 'b' }, theirs: task() });
    assert.deepEqual(revived.changed, []);
    assert.ok(Object.isFrozen(revived) && Object.isFrozen(revived.theirs));
    const odd = revivedConflict({ task_id: 'a', yours: {}, theirs: task(), changed: 5 });
    assert.deepEqual(odd.changed, [], 'a stored list that is not one reads as empty');
    assert.equal(revivedConflict({ task_id: 'a', yours: {} }), null);
    assert.equal(revivedConflict(null), null);
  });
});

describe('stacks', () => {
  test('ops stack per task in issue order, found by key and by command id', () => {
    const stacks = createStacks();
    const first = Object.freeze({ key: 'k1', task_id: 'a', command_id: null });
    stacks.push(first);
    stacks.push(Object.freeze({ key: 'k2', task_id: 'a', command_id: null }));
    stacks.push(Object.freeze({ key: 'k3', task_id: 'b', command_id: null }));
    assert.deepEqual(stacks.of('a').map((op) => op.key), ['k1', 'k2']);
    assert.equal(stacks.size, 3);
    const acked = stacks.replace(first, { command_id: 'c1' });
    assert.equal(stacks.find('k1'), acked);
    assert.equal(stacks.findByCommandId('c1'), acked);
    assert.equal(stacks.findByCommandId(null), null);
    assert.deepEqual(stacks.of('a').map((op) => op.key), ['k1', 'k2'], 'replaced in place');
  });

  test('a change makes a new stack; a task with none has the one empty stack', () => {
    const stacks = createStacks();
    const op = Object.freeze({ key: 'k1', task_id: 'a' });
    stacks.push(op);
    const before = stacks.of('a');
    assert.ok(Object.isFrozen(before));
    stacks.remove(op);
    assert.equal(stacks.of('a'), NO_OPS);
    assert.equal(stacks.has('a'), false);
    assert.equal(stacks.find('k1'), null);
    assert.deepEqual(before.map((o) => o.key), ['k1'], 'the old stack is untouched');
    assert.equal(stacks.replace(op, { state: 'pending' }), op, 'an op on no stack is left as it is');
    assert.equal(stacks.has('a'), false);
  });
});

test('the book of open conflicts: one per task, refreshed to the task as it is, persisted and restored', () => {
  const book = createConflictBook();
  const theirs = { id: 't', title: 'theirs', notes: '', done: false, likes: 0, version: 2 };
  const op = { task_id: 't', kind: 'update', patch: { title: 'mine' }, seen: { title: ['old'], notes: [''], done: [false] } };
  book.open(conflictOf(op, theirs, false));
  assert.deepEqual(book.byTask.get('t').changed, ['title']);

  book.refresh('t', { ...theirs, done: true, version: 3 });
  assert.equal(book.byTask.get('t').theirs.version, 3);
  assert.deepEqual(book.byTask.get('t').changed, ['title', 'done']);
  book.refresh('t', { ...theirs, version: 1 });
  assert.equal(book.byTask.get('t').theirs.version, 3, 'an older task changes nothing');
  book.refresh('u', theirs);
  assert.equal(book.byTask.has('u'), false, 'no conflict is opened by a refresh');

  const saved = JSON.parse(JSON.stringify(book.persisted()));
  const again = createConflictBook();
  assert.equal(again.restore([...saved, { task_id: 'v' }, null]), true);
  assert.deepEqual([...again.byTask.keys()], ['t'], 'what is not a conflict is left out');
  assert.ok(Object.isFrozen(again.byTask.get('t').theirs));
  assert.equal(again.restore(saved), false, 'one per task: an open one is kept');

  assert.equal(book.close('t').kind, 'update');
  assert.equal(book.close('t'), undefined);
  assert.deepEqual(book.persisted(), []);
});
