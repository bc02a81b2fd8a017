// Unit tests of likes as a toggle per browser (static/likes.js).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { isLiked, toggleDelta, compensation, readContributions, sumShares } from '../../static/likes.js';

test('the toggle reads settled and pending together', () => {
  assert.equal(isLiked(0, 0), false);
  assert.equal(isLiked(0, 1), true, 'a pending like shows at once');
  assert.equal(isLiked(1, -1), false, 'a pending unlike too');
  assert.deepEqual([toggleDelta(0, 0), toggleDelta(1, 0), toggleDelta(0, 1), toggleDelta(1, -1)], [1, -1, -1, 1]);
});

test('rapid like, unlike, like compose to one like', () => {
  let pending = 0;
  for (let click = 0; click < 3; click += 1) pending += toggleDelta(0, pending);
  assert.equal(pending, 1);
});

test('a failed like under a pending unlike is compensated, so the share ends at 0', () => {
  // like (+1) then unlike (-1) were sent; the like failed: what is left is -1.
  assert.equal(compensation(0, -1), 1);
  // a discarded like applied after all, and the user liked again: +2.
  assert.equal(compensation(2, 0), -1);
  assert.equal(compensation(1, 0), 0);
  assert.equal(compensation(0, 0), 0);
  assert.equal(compensation(-1, -1), 2);
});

test('stored contributions are read leniently', () => {
  assert.deepEqual([...readContributions('{"a":1,"b":0,"c":"x","d":-1}')], [['a', 1], ['d', -1]]);
  assert.deepEqual([...readContributions('not json')], []);
  assert.deepEqual([...readContributions('[1,2]')], []);
  assert.deepEqual([...readContributions(null)], []);
});

test("the browser's share is every tab's ledger summed; a task at 0 has none", () => {
  const tabA = new Map([['a', 1], ['b', 1]]);
  const tabB = new Map([['a', 1], ['b', -1], ['c', -1]]);
  assert.deepEqual([...sumShares([tabA, tabB, new Map()])], [['a', 2], ['c', -1]]);
  assert.deepEqual([...sumShares([])], []);
});
