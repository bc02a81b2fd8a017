// The notices: kept until dismissed, the newest 50, and a resolved conflict's notice gone
// with it (static/notices.js).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { createNotices } from '../../static/notices.js';

function notices() {
  let clock = 1000;
  return createNotices({ now: () => clock++ });
}

test('a notice gets an id and a time; the list is a new array only when it changes', () => {
  const book = notices();
  const empty = book.list;
  book.add({ task_id: 'a', reason: 'not_found', text: 'gone' });
  const [notice] = book.list;
  assert.notEqual(book.list, empty);
  assert.deepEqual(notice, { id: 1, at: 1000, task_id: 'a', reason: 'not_found', text: 'gone' });
  assert.ok(Object.isFrozen(notice));
  const before = book.list;
  assert.equal(book.dismiss(99), false, 'no such notice');
  assert.equal(book.dropConflict('a'), false, 'not a conflict');
  assert.equal(book.list, before);
});

test('past 50 the oldest drop off; ids keep counting', () => {
  const book = notices();
  for (let i = 0; i < 60; i++) book.add({ task_id: `t${i}`, reason: 'failed', text: `n${i}` });
  assert.equal(book.list.length, 50);
  assert.equal(book.list[0].text, 'n10');
  assert.equal(book.list.at(-1).id, 60);
});

test('dismiss one by id, or all', () => {
  const book = notices();
  for (const text of ['x', 'y', 'z']) book.add({ task_id: 'a', reason: 'failed', text });
  assert.equal(book.dismiss(2), true);
  assert.deepEqual(book.list.map((notice) => notice.text), ['x', 'z']);
  assert.equal(book.dismiss(), true);
  assert.deepEqual(book.list, []);
  assert.equal(book.dismiss(), false, 'nothing left to dismiss');
});

test("a resolved conflict takes its task's conflict notices along, and nothing else", () => {
  const book = notices();
  book.add({ task_id: 'a', reason: 'conflict', text: 'a conflict' });
  book.add({ task_id: 'a', reason: 'kept_moving', text: 'a kept moving' });
  book.add({ task_id: 'a', reason: 'not_found', text: 'a gone' });
  book.add({ task_id: 'b', reason: 'conflict', text: 'b conflict' });
  assert.equal(book.dropConflict('a'), true);
  assert.deepEqual(book.list.map((notice) => notice.text), ['a gone', 'b conflict']);
});
